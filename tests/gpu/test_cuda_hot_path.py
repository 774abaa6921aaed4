"""The training step's hot path on a GPU. Runs where CUDA is present; elsewhere every test is skipped with the
reason printed (pytest -ra)."""
import pytest
import torch

from train.rng import RNGState
from train.sequence_parallel import SequenceLayout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_noise_is_drawn_on_the_gpu_from_a_per_rank_generator_that_resumes_exactly():
    device = torch.device("cuda")
    state = RNGState(seed=3, rank=1, device=device)
    assert state.noise_generator.device.type == "cuda" and state.noise_generator is not state.generator
    torch.randn(1000, generator=state.noise_generator, device=device)
    saved = state.state_dict()
    first = torch.randn(4, 64, generator=state.noise_generator, device=device)
    other = RNGState(seed=0, rank=0, device=device)
    other.load_state_dict(saved)
    assert torch.equal(first, torch.randn(4, 64, generator=other.noise_generator, device=device))
    rank0 = RNGState(seed=3, rank=0, device=device)
    assert not torch.equal(torch.randn(8, generator=rank0.noise_generator, device=device),
                           torch.randn(8, generator=RNGState(3, 1, device).noise_generator, device=device))


@pytest.mark.parametrize("conditioning", ["cross_attention", "joint"])
def test_a_bf16_micro_batch_runs_with_no_host_synchronisation(conditioning):
    """The trainer's real forward_backward_step (frozen pixel autoencoder, built-in text encoder, fused varlen
    attention) under set_sync_debug_mode("error"): any host read of a device value inside the micro-batch raises."""
    from types import SimpleNamespace

    from conf.schema import load_config
    from models.attention import FUSED_VARLEN, available_backends
    from models.autoencoder import build_autoencoder
    from models.dit import TextToVideoModel, text_conditioner
    from models.flops import parameter_groups
    from tests.unit.test_host_syncs import Engine, micro_batch
    from train.trainer import Trainer

    device = torch.device("cuda")
    if not set(available_backends(device)) & set(FUSED_VARLEN):
        pytest.skip("no fused varlen attention kernel here (flash-attn or torch varlen_attn)")
    cfg = load_config(["experiment=demo", "zero.precision=bf16", f"model.conditioning={conditioning}"])
    model = TextToVideoModel(cfg.model).to(device, torch.bfloat16)
    trainer = SimpleNamespace(env=SimpleNamespace(device=device), rng=RNGState(0, 0, device), cfg=cfg, model=model,
                              autoencoder=build_autoencoder(cfg.model.autoencoder), text=text_conditioner(cfg.model),
                              engine=Engine(model), flop_groups=parameter_groups(model),
                              layout=SequenceLayout(1, 0, 1), split=None)
    trainer.latents = lambda batch: Trainer.latents(trainer, batch)
    trainer.text_batch = lambda batch, captions: Trainer.text_batch(trainer, batch, captions)
    batch = micro_batch().pin_memory()
    Trainer.forward_backward_step(trainer, batch)  # warm-up: caches, kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = Trainer.forward_backward_step(trainer, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.loss_sum.device.type == "cuda" and bool(result.finite.all())
