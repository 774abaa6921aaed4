"""The CUDA defects first seen on an H200 (issue 18), each caught here without a GPU.

1. attention dispatch looks at the dtype: fused varlen kernels take fp16/bf16 only;
2. a bf16 model takes the fp32 inputs its producers make (latents, noisy mixes, frozen embeddings);
3. every tensor collective gets a tensor on the run's device (NCCL rejects host tensors, gloo does not);
4. DeepSpeed is never asked for a JIT-built optimizer op.
The CUDA device itself cannot exist here: dispatch is tested through the decision function, and the
collective device check uses the `meta` device as the stand-in for "not the CPU".
"""
import ast
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models import attention
from models.config import ModelConfig, TextEncoderConfig
from models.dit import TextToVideoModel
from models.text_encoder import TextBatch
from models.layers import cu_seqlens_from_lengths

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fused_kernels_installed(monkeypatch):
    """As on the H200 image: torch's varlen_attn present, flash-attn not; fresh dispatch decisions."""
    monkeypatch.setitem(attention._INSTALLED, "torch_varlen", True)
    monkeypatch.setitem(attention._INSTALLED, "flash_attn", False)
    monkeypatch.setitem(attention._INSTALLED, "flash_attn3", False)
    monkeypatch.setitem(attention._INSTALLED, "cudnn", False)
    monkeypatch.setattr(attention, "_RESOLVED", {})
    # the GPU's timing run, standing in: every kernel runs every shape (a test sets its own outcome)
    monkeypatch.setattr(attention, "_time_backend", lambda name, device, dtype, shape=attention.DIT_SHAPE: 1.0)


# -- 1. attention dispatch ---------------------------------------------------------------------------
def test_auto_attention_on_cuda_takes_the_fused_kernel_in_bf16_and_sdpa_in_fp32(fused_kernels_installed, caplog):
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16) == "torch_varlen"
    assert attention.resolve_backend("auto", "cuda", torch.float16) == "torch_varlen"
    with caplog.at_level(logging.WARNING, logger="models.attention"):
        assert attention.resolve_backend("auto", "cuda", torch.float32) == "sdpa"
        assert attention.resolve_backend("auto", "cuda", torch.float32) == "sdpa"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "fp16/bf16" in said[0]  # warned once, with the reason


@pytest.mark.parametrize("faster", ["flash_attn", "torch_varlen"])
def test_with_several_fused_kernels_auto_takes_the_fastest_measured_and_never_on_cpu(fused_kernels_installed,
                                                                                    monkeypatch, faster):
    monkeypatch.setitem(attention._INSTALLED, "flash_attn", True)
    timed = []

    def seconds(name, device, dtype, shape):  # the timing run is the GPU's; its outcome is what this test sets
        timed.append(name)
        return 1.0 if name == faster else 2.0

    monkeypatch.setattr(attention, "_time_backend", seconds)
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16) == faster
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16) == faster
    assert sorted(timed) == ["flash_attn", "torch_varlen"]  # each measured once, then the choice is kept
    assert attention.resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert attention.resolve_backend("torch_varlen", "cuda", torch.bfloat16) == "torch_varlen"


def test_auto_tries_even_a_single_fused_kernel_on_the_models_own_heads_and_head_dim(fused_kernels_installed,
                                                                                     monkeypatch):
    """A kernel that takes bf16 may still reject a head dim (FlashAttention: above 256): auto tries each on the
    asking model's shape, so the model's first forward does not fail. It used to try a fixed 12 x 128, and only
    when two or more kernels were installed."""
    tried = []

    def seconds(name, device, dtype, shape):
        tried.append((name, shape))
        if shape[1] > 256:
            raise RuntimeError(f"{name}: head dim {shape[1]} is not supported")
        return 1.0

    monkeypatch.setattr(attention, "_time_backend", seconds)
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16, (40, 128)) == "torch_varlen"
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16, (4, 320)) == "sdpa"
    assert tried == [("torch_varlen", (40, 128)), ("torch_varlen", (4, 320))]
    q = torch.zeros(3, 4, 320, dtype=torch.bfloat16)  # a forward asks with its own shape: the decision above
    assert attention.resolve_backend("auto", "cuda", q.dtype, (q.shape[1], q.shape[2])) == "sdpa"
    assert len(tried) == 2


def test_a_kernel_that_fails_its_timing_run_is_left_out():
    def seconds(name):
        if name == "flash_attn3":
            raise RuntimeError("no kernel image for this GPU")
        return {"flash_attn": 3.0, "torch_varlen": 2.0}[name]

    chosen, times = attention.fastest(["flash_attn3", "flash_attn", "torch_varlen"], seconds)
    assert chosen == "torch_varlen" and set(times) == {"flash_attn", "torch_varlen"}
    assert attention.fastest(["flash_attn3"], seconds) == (None, {})  # nothing ran: the caller falls back


def test_without_a_fused_kernel_auto_takes_sdpa_never_the_cudnn_comparison_backend(fused_kernels_installed,
                                                                                 monkeypatch):
    monkeypatch.setitem(attention._INSTALLED, "torch_varlen", False)
    monkeypatch.setitem(attention._INSTALLED, "cudnn", True)
    assert attention.available_backends(torch.device("cuda"), torch.bfloat16)[0] == "cudnn"
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa"


def test_flash_attention_3_is_offered_on_hopper_only(fused_kernels_installed, monkeypatch):
    monkeypatch.setitem(attention._INSTALLED, "flash_attn3", True)
    monkeypatch.setattr(attention, "_is_hopper", lambda device: False)
    assert "flash_attn3" not in attention.available_backends(torch.device("cuda"), torch.bfloat16)
    with pytest.raises(attention.BackendUnavailable, match="Hopper"):
        attention.resolve_backend("flash_attn3", "cuda", torch.bfloat16)
    monkeypatch.setattr(attention, "_is_hopper", lambda device: True)
    assert attention.available_backends(torch.device("cuda"), torch.bfloat16)[0] == "flash_attn3"


def test_a_forced_fused_kernel_in_fp32_is_a_clear_error(fused_kernels_installed):
    with pytest.raises(attention.BackendUnavailable, match="torch_varlen.*fp16/bf16"):
        attention.resolve_backend("torch_varlen", "cuda", torch.float32)


def test_dispatch_probes_no_module_during_a_forward(fused_kernels_installed, monkeypatch):
    """Module probing belongs to import time: inside a forward it costs every step and breaks a compiled graph."""
    import importlib.util

    def no_probe(*args, **kwargs):
        raise AssertionError("find_spec called while dispatching attention")

    monkeypatch.setattr(importlib.util, "find_spec", no_probe)
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16) == "torch_varlen"


# -- 2. inputs reach a bf16 model in bf16 ---------------------------------------------------------------
def _model(text=None, **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=2, attention_backend="sdpa", **overrides,
                      text=text or TextEncoderConfig(dim=32, depth=1, heads=2, max_tokens=16))
    return TextToVideoModel(cfg)


@pytest.mark.parametrize("conditioning", ["cross", "joint"])
def test_a_bf16_model_takes_fp32_latents_and_matches_fp32_within_bf16_error(conditioning):
    model = _model(conditioning=conditioning)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada" in name or name.startswith("dit.final."):
                p.normal_(0, 0.2)
    latents = [torch.randn(3, 4, 16, 16), torch.randn(3, 2, 12, 20)]  # fp32, as the autoencoder makes them
    t = torch.tensor([0.3, 0.7])
    text = model.text_encoder.tokenizer.batch(["a red circle", "b"])
    reference = model(latents, t, text)
    out = model.to(torch.bfloat16)(latents, t, text)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_frozen_text_embeddings_in_fp32_enter_a_bf16_model(monkeypatch):
    """A pretrained text encoder hands fp32 embeddings; the DiT casts them with the latents."""
    import models.dit as dit

    monkeypatch.setattr(dit, "pretrained_text_dim", lambda path: 24)
    model = _model(text=TextEncoderConfig(name="pretrained", path="unused")).to(torch.bfloat16)
    lengths = [5, 3]
    text = TextBatch(None, None, cu_seqlens_from_lengths(lengths, "cpu"), 5, list(lengths), embeddings=torch.randn(8, 24))
    out = model([torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)], torch.tensor([0.5, 0.5]), text)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_the_vae_in_bf16_takes_fp32_clips_and_noise():
    from models.vae import CausalVideoVAE, vae_loss

    torch.manual_seed(0)
    vae = CausalVideoVAE(latent_channels=4, base_channels=8).to(torch.bfloat16)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    noise = torch.randn(1, 4, 3, 2, 2)  # 4x in time (causal: 1 + 8/4 frames), 8x in space
    reconstruction, mean, logvar = vae(x, noise=noise)
    loss, _, _ = vae_loss(x, reconstruction, mean, logvar, 1e-6)
    assert reconstruction.dtype == torch.bfloat16 and loss.dtype == torch.float32


# -- 3. collectives on env.device --------------------------------------------------------------------
class _Intercepted(Exception):
    pass


@pytest.fixture
def collective_devices(monkeypatch):
    """A two-rank world whose all_reduce records the device of what it is given, then stops the caller
    (meta tensors hold no values to reduce). The run's device is `meta`, standing in for CUDA: a tensor
    built on the host is then visibly off-device, as NCCL would find it."""
    import torch.distributed as dist

    seen = []

    def checking_all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        raise _Intercepted

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", checking_all_reduce)
    return seen


META = torch.device("meta")


def test_step_metrics_are_reduced_on_the_run_device(collective_devices):
    from train.trainer import Trainer

    from train.sequence_parallel import SequenceLayout

    trainer = SimpleNamespace(env=SimpleNamespace(device=META, world_size=2), layout=SequenceLayout(1, 0, 2))
    from train.tracking import StepOutcome, StepResult

    outcome = StepOutcome([StepResult(finite=torch.tensor([True]), tokens=10, loss_sum=2.0, flops=1e9)], batches=[],
                          data_time=0.1, trained=True)
    with pytest.raises(_Intercepted):
        Trainer._metrics(trainer, outcome, 1.0)
    assert collective_devices == [META]


def test_the_stop_agreement_is_reduced_on_the_run_device(collective_devices):
    from train.preemption import StopRequest

    with pytest.raises(_Intercepted):
        StopRequest(META, stop_file="").agreed()
    assert collective_devices == [META]


def test_the_finite_loss_agreement_is_reduced_on_the_run_device(collective_devices):
    from train.collectives import all_ranks_finite

    with pytest.raises(_Intercepted):
        all_ranks_finite(torch.tensor(1.0), META)
    assert collective_devices == [META]


TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                      "send", "recv", "isend", "irecv"}


def test_no_module_calls_a_tensor_collective_except_through_train_collectives():
    offenders = []
    for package in ("train", "data", "models", "launch"):
        for path in (REPO / package).rglob("*.py"):
            if path == REPO / "train" / "collectives.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in TENSOR_COLLECTIVES and isinstance(node.func.value, (ast.Name, ast.Attribute)) \
                        and ast.unparse(node.func.value) in ("dist", "torch.distributed"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node.func)}")
    assert not offenders, "tensor collectives outside train/collectives.py: " + ", ".join(offenders)


# -- 4. no JIT-built optimizer ------------------------------------------------------------------------
class _EngineConfigView:
    """What DeepSpeed's optimizer selection reads from an engine, taken from our own config."""

    def __init__(self, ds_config):
        self.ds_config = ds_config

    def zero_use_cpu_optimizer(self):
        return "offload_optimizer" in self.ds_config["zero_optimization"]

    zenflow = False

    def bf16_optimizer_states(self):
        return False


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
@pytest.mark.parametrize("offload", [False, True])
def test_deepspeed_builds_torch_adamw_and_no_jit_op(device_type, offload, monkeypatch):
    """DeepSpeed's own selection, given our config, must land on torch's AdamW: its FusedAdam/CPUAdam are
    compiled with nvcc/g++ at run time (and FusedAdam fails on TORCH_CUDA_ARCH_LIST=9.0a)."""
    from deepspeed.ops.op_builder.builder import OpBuilder
    from deepspeed.runtime.engine import DeepSpeedEngine

    from conf.schema import load_config
    from train.engine import deepspeed_config

    def no_build(*args, **kwargs):
        raise AssertionError("a DeepSpeed op was built")

    monkeypatch.setattr(OpBuilder, "load", no_build)
    monkeypatch.setattr(OpBuilder, "jit_load", no_build)
    cfg = load_config(["experiment=demo", f"zero.offload_optimizer={offload}"], check=False)
    ds_config = deepspeed_config(cfg, 8, device_type)
    params = dict(ds_config["optimizer"]["params"])
    optimizer_class, extra = DeepSpeedEngine.get_optimizer_configuration(_EngineConfigView(ds_config), params, True)
    assert optimizer_class is torch.optim.AdamW
    weights = [torch.nn.Parameter(torch.randn(4))]
    optimizer = optimizer_class(weights, **params, **extra) if device_type == "cpu" else None
    if optimizer is not None:
        weights[0].grad = torch.ones(4)
        optimizer.step()  # builds and runs with exactly what DeepSpeed would pass
    assert params.get("fused") is (device_type == "cuda" and not offload)
