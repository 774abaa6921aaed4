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


def traceable_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend="auto"):
    """Packed attention as one traceable op with no host read, as the CUDA varlen kernels are to Dynamo: SDPA over
    the whole pack with a block-diagonal mask built from the offsets on the device."""
    import torch.nn.functional as F

    clip_q = torch.bucketize(torch.arange(q.shape[0]), cu_q[1:], right=True)
    clip_k = torch.bucketize(torch.arange(k.shape[0]), cu_k[1:], right=True)
    mask = clip_q[:, None] == clip_k[None, :]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("attention_kind", ["per_clip_sdpa", "traceable"])
def test_regionally_compiled_blocks_match_eager_in_loss_and_gradients(attention_kind, monkeypatch):
    """torch.compile of each block in place, on top of activation checkpointing, as train/parallelize.py orders them. fp32; equal within rounding. Dynamo's counters
    say what compiled: with a traceable attention (the CUDA kernels' case) every checkpointed block is one graph and
    nothing breaks; the CPU's per-clip SDPA reads the clips' lengths on the host, which breaks the graph inside the
    checkpointed region, so those blocks run eagerly (why model.compile is off by default there)."""
    import torch._dynamo as dynamo

    if attention_kind == "traceable":
        import models.dit
        import models.layers

        monkeypatch.setattr(models.layers, "varlen_attention", traceable_attention)
        monkeypatch.setattr(models.dit, "varlen_attention", traceable_attention)
    eager = tiny_model(conditioning="joint", dtype=torch.float32)
    compiled = tiny_model(conditioning="joint", dtype=torch.float32)
    apply_activation_checkpointing(compiled)
    # Inductor's C++ build of the traced graphs takes over a minute on 2 cores: aot_eager traces the same graphs
    # (Dynamo, AOTAutograd's forward and backward) and runs them without generated code.
    assert apply_compile(compiled, "aot_eager" if attention_kind == "traceable" else "inductor") == 2
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]

    def loss_and_grads(model):
        latents, t = clips(torch.float32), torch.tensor([0.2, 0.5, 0.9])
        loss = model(latents, t, text_conditioner(model.cfg).batch(CAPTIONS)).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    dynamo.reset()
    dynamo.utils.counters.clear()
    loss, grads = loss_and_grads(eager)
    assert compile_report()["frames_seen"] == 0
    loss_c, grads_c = loss_and_grads(compiled)
    assert torch.allclose(loss, loss_c, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_c[name], rtol=1e-4, atol=1e-5), name
    report = compile_report()
    assert report["frames_compiled"] == 2, report  # both blocks reached Dynamo
    if attention_kind == "traceable":
        assert report["graphs"] == 2 and report["graph_breaks"] == {}, report
    else:
        assert report["graphs"] == 0, report
        assert {break_kind(reason) for reason in report["graph_breaks"]} == {"Data dependent operator"}, report


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
    monkeypatch.setattr(attention, "_time_backend", lambda name, device, dtype, shape: 1.0)  # the GPU's timing run
    cfg = load_config(["experiment=demo", f"zero.precision={precision}",
                       f"model.compile={'null' if setting is None else str(setting).lower()}"])
    assert compile_wanted(cfg, device_type) is wanted
