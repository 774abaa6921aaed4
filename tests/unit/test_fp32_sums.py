"""bf16 runs sum over tokens in fp32. A reduction that accumulates in bf16 stops growing once its sum is 256 times a
term (8 bits of mantissa): the adaLN shift, scale and gate gradients are sums over a clip's tens of thousands of
tokens. The CPU's index_add sums exactly whatever the dtype, so these tests cannot watch the numbers go wrong on this
machine; they record every aten op of the backward instead (a TorchDispatchMode) and fail on an accumulating
scatter (index_add, scatter_add, index_put with accumulate) of bf16 terms: on CUDA those are bf16 atomic adds.
Reductions (sum, mm) are left to their kernels, which accumulate bf16 in fp32 on CPU and CUDA (probed below)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models.dit import per_token, text_conditioner
from tests.unit.test_model import CAPTIONS, tiny_model

SCATTERS = {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_", "_index_put_impl_",
            "_unsafe_index_put"}


class RecordScatters(TorchDispatchMode):
    """Every accumulating scatter of low-precision terms: (op, dtype, terms, rows they land in)."""

    def __init__(self):
        super().__init__()
        self.low_precision = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SCATTERS:
            tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            indices = [t for t in tensors if not t.is_floating_point()]
            values = [t for t in tensors if t.is_floating_point()]
            accumulates = name.startswith(("index_add", "scatter_add")) or bool(kwargs.get("accumulate")) or \
                (len(args) > 3 and args[3] is True)
            # an index that repeats is a sum; one that does not only places rows (a gather's backward, 1:1)
            repeats = any(i.numel() > i.unique().numel() for i in indices)
            low = [v.dtype for v in values if v.dtype in (torch.bfloat16, torch.float16)]
            if accumulates and repeats and low:
                self.low_precision.append((name, low[0], max(i.numel() for i in indices)))
        return func(*args, **kwargs)


def backward_scatters(model, latents, t):
    out = model(latents, t, text_conditioner(model.cfg).batch(CAPTIONS))
    with RecordScatters() as recorder:
        out.float().pow(2).mean().backward()
    return recorder.low_precision


def bf16_clips():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 4, 16, 16, generator=g).bfloat16(), torch.randn(3, 2, 12, 20, generator=g).bfloat16(),
            torch.randn(3, 1, 20, 8, generator=g).bfloat16()]


@pytest.mark.parametrize("modulation", ["per_block", "shared"])
@pytest.mark.parametrize("conditioning", ["cross_attention", "joint"])
def test_no_sum_over_tokens_accumulates_in_bf16_in_the_backward(modulation, conditioning):
    model = tiny_model(dtype=torch.bfloat16, modulation=modulation, conditioning=conditioning)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.bfloat16)
    assert backward_scatters(model, bf16_clips(), t) == []
    block = model.dit.blocks[0] if conditioning == "cross_attention" else model.dit.blocks[0].streams["video"]
    modulation = block.modulation if modulation == "shared" else block.ada.weight
    assert modulation.grad is not None and modulation.grad.abs().max() > 0  # the gather's backward did run


def test_golden_the_plain_gather_accumulates_its_backward_in_bf16(monkeypatch):
    """What the model did before: index_select, whose backward is index_add in the gradient's dtype."""
    import models.dit

    monkeypatch.setattr(models.dit, "per_token", lambda values, segments: values.index_select(0, segments))
    model = tiny_model(dtype=torch.bfloat16)
    found = backward_scatters(model, bf16_clips(), torch.tensor([0.2, 0.5, 0.9], dtype=torch.bfloat16))
    assert found and all(op.startswith("index_add") and dtype == torch.bfloat16 for op, dtype, _ in found)


class RecordDtypes:
    """The dtype of what Wan computes where diffusers keeps fp32 modules: the time embedder's linears' outputs and
    every modulation table gathered to tokens (models.dit.per_token: the blocks' and the output head's)."""

    def __init__(self, model, monkeypatch):
        import models.wan

        self.found = []
        embedder = model.dit.condition_embedder.time_embedder
        for name in ("linear_1", "linear_2"):
            getattr(embedder, name).register_forward_hook(
                lambda module, args, out, name=name: self.found.append((f"time_embedder.{name}", out.dtype)))
        gather = models.wan.per_token
        monkeypatch.setattr(models.wan, "per_token", lambda values, segments: (
            self.found.append(("modulation", values.dtype)), gather(values, segments))[1])


def test_wan_computes_what_diffusers_keeps_in_fp32_in_fp32_in_a_bf16_model(monkeypatch):
    """diffusers keeps Wan's time_embedder and scale_shift_tables in fp32 (`_keep_in_fp32_modules`); a bf16
    DeepSpeed engine holds every parameter in bf16, so Kino computes those in fp32 from them: the time embedding's
    matmuls, and every modulation table, the output head's included, before it reaches the tokens."""
    model = tiny_model(dtype=torch.bfloat16, arch="wan")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # as the engine holds them
    recorder = RecordDtypes(model, monkeypatch)
    assert backward_scatters(model, bf16_clips(), torch.tensor([0.2, 0.5, 0.9], dtype=torch.bfloat16)) == []
    names = {name for name, _ in recorder.found}
    assert names == {"time_embedder.linear_1", "time_embedder.linear_2", "modulation"}
    assert all(dtype == torch.float32 for _, dtype in recorder.found), recorder.found


def test_golden_a_bf16_time_embedder_and_head_table_are_caught(monkeypatch):
    """The model before the change: the time embedder ran in the parameters' dtype, the head's table added in bf16."""
    import torch.nn.functional as F

    import models.wan

    monkeypatch.setattr(models.wan.FP32Linear, "forward", lambda self, x: F.linear(x.to(self.weight.dtype),
                                                                                   self.weight, self.bias))
    model = tiny_model(dtype=torch.bfloat16, arch="wan")

    def bf16_head(self, x, temb, segments):
        shift, scale = (models.wan.per_token(m.squeeze(1), segments)
                        for m in (self.scale_shift_table + temb[:, None]).chunk(2, dim=1))
        return self.proj_out((self.norm_out(x.float()) * (1 + scale) + shift).type_as(x))

    monkeypatch.setattr(models.wan.WanDiT, "output", bf16_head)
    recorder = RecordDtypes(model, monkeypatch)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.bfloat16)
    model(bf16_clips(), t, text_conditioner(model.cfg).batch(CAPTIONS))
    assert ("time_embedder.linear_1", torch.bfloat16) in recorder.found
    assert ("modulation", torch.bfloat16) in recorder.found


def test_the_modulation_gather_sums_65536_tokens_a_clip_as_fp64_does():
    tokens = 65_536
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 8, generator=g).bfloat16().requires_grad_()
    segments = torch.arange(2).repeat_interleave(tokens)
    grad = (torch.rand(2 * tokens, 8, generator=g) + 0.5).bfloat16()  # all positive: no cancellation hides a tail
    per_token(values, segments).backward(grad)
    reference = grad.double().reshape(2, tokens, 8).sum(1)
    assert values.grad.dtype == torch.bfloat16
    assert torch.allclose(values.grad.double(), reference, rtol=2 ** -8, atol=0)  # one bf16 rounding of the sum
    naive = torch.zeros(2, 8, dtype=torch.bfloat16)
    for chunk in grad.reshape(2, tokens, 8).unbind(1)[:4096]:  # what bf16 atomics do, term by term (a part)
        naive += chunk
    assert (naive.double() < reference * 4096 / tokens * 0.5).all()  # it stalls long before the true sum


def test_reductions_accumulate_bf16_terms_in_fp32():
    """The kernels the backward leaves alone (bias sums, matmuls over tokens) keep an fp32 accumulator."""
    ones = torch.ones(65_536, 4, dtype=torch.bfloat16)
    assert float(ones.sum(0)[0]) == 65_536.0
    assert float((ones.T @ ones)[0, 0]) == 65_536.0
    if torch.cuda.is_available():
        assert float(ones.cuda().sum(0)[0]) == 65_536.0


ENGINE_PROBE = r"""
import json, os, sys
import torch
sys.path.insert(0, os.getcwd())
from conf.schema import load_config
from train.engine import build_engine, init_distributed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
env = init_distributed()  # as training sets up: gloo, without DeepSpeed's CPU collective op (a minute to build)
found = {}
for stage in (1, 3):  # ZeRO-1 (then DeepSpeed's BF16_Optimizer) and ZeRO-3; ZeRO-2 reads the same two keys as ZeRO-1
    cfg = load_config(["experiment=demo", "zero.precision=bf16", f"zero.stage={stage}",
                       "zero.gradient_accumulation_steps=2"])
    engine = build_engine(torch.nn.Linear(8, 8), cfg, env)
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).mean())
        engine.step()
    optimizer = engine.optimizer
    found[stage] = [str(engine.communication_data_type), str(getattr(optimizer, "gradient_accumulation_dtype",
                    getattr(optimizer, "grad_acc_dtype", None))), type(optimizer).__name__]
# fp32 ZeRO-3: the optimizer's master partition is the module's own fp32 partition (DeepSpeed, left to itself,
# clones it); the same two steps without Kino's fix give the same weights from a second copy.
import deepspeed
from train.engine import deepspeed_config
cfg = load_config(["experiment=demo", "zero.precision=fp32", "zero.stage=3"])
for shared in (True, False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    if shared:
        engine = build_engine(model, cfg, env)
    else:
        engine = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=deepspeed_config(cfg, 1, "cpu"))[0]
    torch.manual_seed(1)
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 8)).pow(2).mean())
        engine.step()
    optimizer = engine.optimizer
    pairs = list(zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat))
    weights = torch.cat([p.ds_tensor.flatten() for p in model.parameters()]).tolist()
    found[f"fp32 shared={shared}"] = {"same storage": [m.data_ptr() == p.data_ptr() for m, p in pairs],
                                      "weights": weights}
# The end of a run frees the AdamW moments before its videos (Trainer.release_optimizer_state): nothing else holds them.
import types, weakref
from train.trainer import Trainer
moments = [weakref.ref(t) for s in optimizer.optimizer.state.values() for t in s.values()
           if torch.is_tensor(t) and t.dim()]
Trainer.release_optimizer_state(types.SimpleNamespace(engine=engine))
found["moments"] = [len(moments), sum(ref() is not None for ref in moments)]
print(json.dumps(found))
"""


def test_deepspeed_accumulates_and_reduces_bf16_gradients_in_fp32():
    """A real DeepSpeed engine (one gloo rank) under ZeRO-1 and ZeRO-3 in bf16: its gradient accumulation across
    micro-batches and its reduction across ranks are fp32 (DeepSpeed's default for both is the model's dtype).
    Under ZeRO-3 in fp32 the optimizer keeps no second fp32 copy of the partition, and trains the same."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from data.ray_head import free_local_port

    result = subprocess.run([sys.executable, "-c", ENGINE_PROBE, str(free_local_port())], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    shared, cloned = found.pop("fp32 shared=True"), found.pop("fp32 shared=False")
    held, alive = found.pop("moments")
    assert held >= 2 and alive == 0, "the moments outlived Trainer.release_optimizer_state"
    assert shared["same storage"] and all(shared["same storage"]), "fp32 ZeRO-3 kept a second fp32 master copy"
    assert not any(cloned["same storage"]), "DeepSpeed alone shares the master now: train.engine's fix can go"
    assert shared["weights"] == cloned["weights"]
    for stage, (communication, accumulation, optimizer) in found.items():
        assert communication == "torch.float32", (stage, optimizer)
        assert accumulation == "torch.float32", (stage, optimizer)
