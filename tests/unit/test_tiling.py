"""Tiling (model.mlp_chunks, model.loss_chunks): the same outputs and gradients as the untiled model, with the
same parameter names (a checkpoint loads either way)."""
import copy

import pytest
import torch

from conf.schema import load_config
from models.dit import TextToVideoModel, text_conditioner
from train.parallelize import apply_activation_checkpointing, apply_tiling


def _model_and_batch(conditioning):
    cfg = load_config(["model.dim=32", "model.depth=2", "model.heads=2", "model.text.dim=16", "model.text.depth=1",
                       "model.text.heads=2", f"model.conditioning={conditioning}"])
    torch.manual_seed(0)
    model = TextToVideoModel(cfg.model)
    with torch.no_grad():
        for p in model.parameters():  # off adaLN-Zero's start, so every gradient is compared
            p.add_(torch.randn_like(p) * 0.05)
    latents = [torch.randn(3, 2, 8, 16), torch.randn(3, 1, 8, 8)]
    text = text_conditioner(cfg.model).batch(["a red circle", "blue"])
    return model, (latents, torch.tensor([0.3, 0.8]), text)


def _gradients(model, batch):
    model.zero_grad()
    out = model(*batch)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("conditioning", ["cross_attention", "joint"])
def test_tiled_mlp_and_head_reproduce_the_untiled_model(conditioning):
    model, batch = _model_and_batch(conditioning)
    tiled = copy.deepcopy(model)
    apply_tiling(tiled, mlp_chunks=3, loss_chunks=4)
    apply_activation_checkpointing(tiled)  # nested in the block's own checkpoint, as a long run sets them
    reference, grads = _gradients(model, batch)
    calls = {"fc1": 0, "final": 0}
    first_mlp = next(m for m in tiled.dit.blocks[0].modules() if m.__class__.__name__ == "MLP")
    first_mlp.fc1.register_forward_hook(lambda *_: calls.__setitem__("fc1", calls["fc1"] + 1))
    tiled.dit.final.register_forward_hook(lambda *_: calls.__setitem__("final", calls["final"] + 1))
    with torch.no_grad():
        tiled(*batch)
    assert calls == {"fc1": 3, "final": 4}  # one call per chunk: the activations exist a chunk at a time
    out, tiled_grads = _gradients(tiled, batch)
    assert torch.allclose(out, reference, atol=1e-6)
    assert grads.keys() == tiled_grads.keys() and len(grads) > 40
    for name in grads:
        assert torch.allclose(tiled_grads[name], grads[name], rtol=1e-4, atol=1e-7), name
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in model.named_parameters()]
