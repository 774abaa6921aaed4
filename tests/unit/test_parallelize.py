"""train/parallelize.py applies activation checkpointing from outside the model: same outputs and gradients, the
same parameter names (checkpoints load either way), and less kept for backward."""
import pytest
import torch

from models.dit import text_conditioner
from tests.unit.test_model import CAPTIONS, clips, tiny_model
from train.parallelize import (apply_activation_checkpointing, apply_compile, break_kind, compile_report,
                                compile_wanted, repeated_blocks)


def loss_grads_and_saved_bytes(model):
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    latents, t = clips(), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(latents, t, text_conditioner(model.cfg).batch(CAPTIONS)).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("conditioning", ["cross_attention", "joint"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients_and_keep_less(conditioning):
    plain = tiny_model(conditioning=conditioning)
    checkpointed = tiny_model(conditioning=conditioning)
    assert apply_activation_checkpointing(checkpointed) == 2 == len(repeated_blocks(checkpointed))
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()

    loss, grads, saved = loss_grads_and_saved_bytes(plain)
    loss_c, grads_c, saved_c = loss_grads_and_saved_bytes(checkpointed)
    assert torch.equal(loss, loss_c)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_c[name], rtol=0, atol=1e-12), name
    assert saved_c < 0.5 * saved, (saved_c, saved)


def test_checkpointing_applies_only_in_training():
    checkpointed, plain = tiny_model(), tiny_model()
    apply_activation_checkpointing(checkpointed)
    checkpointed.eval(), plain.eval()  # evaluation with gradients on (e.g. a probe) keeps everything, as without
    assert loss_grads_and_saved_bytes(checkpointed)[2] == loss_grads_and_saved_bytes(plain)[2]


def test_regionally_compiled_blocks_match_eager_in_loss_and_gradients():
    """torch.compile with inductor on CPU (a C++ compiler builds the kernels): each block compiled in place, on top
    of activation checkpointing, as train/parallelize.py orders them. fp32; equal within rounding."""
    eager = tiny_model(conditioning="joint", dtype=torch.float32)
    compiled = tiny_model(conditioning="joint", dtype=torch.float32)
    apply_activation_checkpointing(compiled)
    assert apply_compile(compiled) == 2
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]

    def loss_and_grads(model):
        latents, t = clips(torch.float32), torch.tensor([0.2, 0.5, 0.9])
        loss = model(latents, t, text_conditioner(model.cfg).batch(CAPTIONS)).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()
    loss, grads = loss_and_grads(eager)
    assert compile_report()["graphs"] == 0
    loss_c, grads_c = loss_and_grads(compiled)
    assert torch.allclose(loss, loss_c, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_c[name], rtol=1e-4, atol=1e-5), name
    # Dynamo captured graphs for the blocks (a compile that fell back to eager everywhere captures none), and broke
    # them only where the CPU's per-clip attention reads the clips' lengths.
    report = compile_report()
    assert report["graphs"] >= 2 and report["frames_compiled"] >= 2, report
    assert {break_kind(reason) for reason in report["graph_breaks"]} <= {"Data dependent operator"}, report


@pytest.mark.parametrize("setting, device_type, precision, wanted", [
    (None, "cuda", "bf16", True), (None, "cuda", "fp32", False), (None, "cpu", "bf16", False),
    (False, "cuda", "bf16", False), (True, "cpu", "fp32", True)])
def test_compile_is_on_by_default_with_cuda_and_a_fused_attention_kernel(setting, device_type, precision, wanted,
                                                                         monkeypatch):
    from conf.schema import load_config
    from models import attention

    monkeypatch.setitem(attention._INSTALLED, "torch_varlen", True)  # as on the H200 image
    monkeypatch.setitem(attention._INSTALLED, "flash_attn", False)
    monkeypatch.setitem(attention._INSTALLED, "flash_attn3", False)
    monkeypatch.setattr(attention, "_RESOLVED", {})
    cfg = load_config(["experiment=demo", f"zero.precision={precision}",
                       f"model.compile={'null' if setting is None else str(setting).lower()}"])
    assert compile_wanted(cfg, device_type) is wanted
