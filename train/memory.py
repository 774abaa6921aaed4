"""`python -m train.memory [overrides] --world-size N --gpu H100`: will this run fit?

Per-GPU memory of a training run, estimated before launch:
  * parameters, gradients and optimizer state by the ZeRO formulas (Rajbhandari et al.): with Ψ
    parameters, bf16 keeps 2Ψ weights + 4Ψ gradients (accumulated and reduced in fp32: train/engine.py) + 12Ψ
    fp32 master/Adam state; fp32 keeps 4Ψ + 4Ψ + 12Ψ under ZeRO-1/2 (DeepSpeed's optimizer keeps an fp32 master
    partition beside the module's fp32 weights) and 4Ψ + 4Ψ + 8Ψ under ZeRO-3 (the module's partition is the
    master: train/engine.py `fp32_master_shared`) and without ZeRO. ZeRO-1 divides the optimizer state by
    the world size N, ZeRO-2 also the gradients, ZeRO-3 all.
  * DeepSpeed's communication buckets.
  * activations of one micro-batch (the stage's token budget T): each DiT block saves about
    ACTIVATION_VALUES_PER_TOKEN x d values per token for backward (counted for Kino's DiT and Wan's blocks from the
    tensors autograd saves, see tests/unit/test_memory.py); with activation checkpointing a block keeps only
    its input, and one block is recomputed at a time. Attention scores are never stored on GPU (flash /
    fused kernels); CPU kernels keep only per-row statistics.
  * what training keeps beside the ZeRO states: the EMA (train/ema.py: fp32, each rank its 1/N of the trained
    parameters, 4Ψ/N), and under ZeRO-3 the parameters gathered at once during forward and backward
    (zero.max_live_parameters: two blocks' by default) in the compute dtype.
  * frozen parameters (LoRA's base) hold weights only: no gradients, no optimizer state.
  * the frozen pretrained encoders (UMT5/T5 text encoder at model.text.dtype, bf16 on a GPU by default; diffusers
    VAE at model.autoencoder.dtype; CLIP image encoder at model.image.dtype), counted from their safetensors headers
    when `model.text.path` / `model.autoencoder.path` / `model.image.path` name a local directory, and said to be
    not counted otherwise. A stage that reads a latent cache loads neither.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

ACTIVATION_VALUES_PER_TOKEN = 42  # x model.dim, per DiT block, without checkpointing
OUTSIDE_BLOCKS_VALUES_PER_TOKEN = 8  # patch embedding, final layer, loss, x model.dim
HEAD_VALUES_PER_TOKEN = 3  # of those, the output head's norm and modulation (what model.loss_chunks tiles)
GPU_MEMORY_GIB = {"A100-40": 40, "A100-80": 80, "H100": 80, "H200": 141, "L40S": 48, "RTX4090": 24}


@dataclass
class MemoryEstimate:
    parameters: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float  # peak: saved_activations + one block recomputed under checkpointing
    saved_activations: float = 0.0
    ema: float = 0.0  # this rank's pieces of the fp32 EMA of the trained parameters
    gathered: float = 0.0  # ZeRO-3: the parameters whole at once during forward and backward
    encoders: float = 0.0  # frozen pretrained text encoder, VAE and image encoder
    sampling: float = 0.0  # the main rank: the whole EMA model in the compute dtype, while evaluation or videos run
    moments: float = 0.0  # of the optimizer row, the AdamW moments, freed before the end-of-run videos (as the EMA)
    sampling_in_loop: bool = False  # tracking asks for evaluations or videos during training
    trainable: int = 0
    frozen: int = 0
    not_counted: Tuple[str, ...] = ()  # encoders the config names without weights on disk

    ROWS = ("parameters", "gradients", "optimizer", "buffers", "activations", "ema", "gathered", "encoders")

    @property
    def total(self) -> float:
        """The peak, during backward: the states, the EMA and the encoders always, with the micro-batch's
        activations, the buffers and (ZeRO-3) the gathered parameters."""
        held = self.parameters + self.gradients + self.optimizer + self.ema + self.encoders
        return held + self.buffers + self.activations + self.gathered

    @property
    def sampling_peak(self) -> float:
        """The main rank while it samples or evaluates: the training state it holds, the encoders and the whole EMA
        model (train.trainer `ema_model`). In the loop with everything; at the end of the run without the AdamW
        moments and the EMA's pieces (freed after the last checkpoint, the pieces as they are consolidated). The
        sampler's own activations (one block's, no gradients) are left out."""
        held = self.parameters + self.gradients + self.optimizer + self.ema + self.encoders + self.sampling
        return held if self.sampling_in_loop else held - self.moments - self.ema

    @property
    def peak(self) -> float:
        """The larger of training's peak and the main rank's while it samples."""
        return max(self.total, self.sampling_peak)

    def fits(self, capacity_bytes: float, headroom: float = 0.9) -> bool:
        """Fits with 10% left for the allocator, kernels' workspaces and fragmentation: training and sampling."""
        return self.peak <= capacity_bytes * headroom

    def advice(self) -> str:
        """What to change when it does not fit, for whichever peak is the larger."""
        if self.sampling_peak > self.total:
            return ("while sampling (the whole EMA model on the main rank): " + (
                "turn off evaluation and videos during training (tracking.eval_prompts=0 tracking.eval_clips=0 "
                "tracking.video_every=0; sample from a checkpoint with python -m train.generate), "
                if self.sampling_in_loop else "") + "use a latent cache (no encoders on the GPU) or more GPUs")
        return ("in training: raise zero.stage, turn on model.activation_checkpointing, lower the stages' "
                "token_budget, or use more GPUs")


def parameter_counts(model_cfg) -> Tuple[int, int]:
    """(trainable, frozen) parameters of the trained model, from the config alone (built on the meta device, LoRA
    adapters attached): a launcher estimates on the submit host, where the weights need not be."""
    from models.dit import TextToVideoModel, planned_context_dim

    with torch.device("meta"):
        model = TextToVideoModel(model_cfg, context=planned_context_dim(model_cfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def stored_parameters(path: Optional[str]) -> Optional[int]:
    """The parameters in a local weights directory's safetensors files, from their headers (no tensor is read);
    None when there are none to read."""
    from pathlib import Path

    if not path or not Path(path).is_dir():
        return None
    files = sorted(Path(path).rglob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def frozen_encoders(model_cfg) -> Tuple[int, Tuple[str, ...]]:
    """(bytes of the frozen pretrained encoders the config loads on a GPU, the ones it names but cannot count):
    the text encoder at model.text.dtype (auto: bf16), the VAE at model.autoencoder.dtype (auto: bf16), the CLIP
    image encoder at model.image.dtype (auto: bf16; Wan's ViT-H/14, 0.63B parameters, counted whole, though the layer
    it drops when it loads, 1/32 of them, is never on the GPU)."""
    from models.precision import frozen_dtype

    counted, missing = 0, []
    parts = (("text encoder", "text", model_cfg.text.name == "pretrained"),
             ("VAE", "autoencoder", model_cfg.autoencoder.name == "diffusers"),
             ("image encoder", "image", bool(model_cfg.image.path)))
    for label, key, loaded in parts:
        if not loaded:
            continue
        part = getattr(model_cfg, key)
        found = stored_parameters(part.path)
        if found is None:
            missing.append(f"{label} (model.{key}.path: no local weights to count)")
        else:
            counted += found * frozen_dtype(part.dtype, "cuda").itemsize
    return counted, tuple(missing)


def estimate(cfg, world_size: int, token_budget: int = None, text_tokens: int = None,
             sequence: int = None, ring: int = None) -> MemoryEstimate:
    """`sequence`: the sequence-parallel degree N = Ulysses x ring (docs/scaling.md; default parallel.sequence),
    `ring` its ring degree R (default parallel.ring, or 1 where `sequence` is given alone). The N ranks of a group
    share one micro-batch of `token_budget` tokens, each holding 1/N of them; ZeRO still shards the model states
    over all ranks. Ulysses (N / R > 1) adds one block's transient all-to-all buffers (q, k, v and the output:
    4 x tokens/N x d values); a ring (R > 1) adds its blocks in flight, at the peak in backward: the key and value
    block held and the one arriving, and their gradients travelling with them (8 x tokens/N x d values).
    Tiling: model.mlp_chunks = c keeps one chunk of an MLP's two (tokens x mlp_ratio d) activations at a time,
    model.loss_chunks likewise the output head's."""
    if ring is None:
        ring = cfg.parallel.ring if sequence is None else 1
    sequence = cfg.parallel.sequence if sequence is None else sequence
    stage = cfg.zero.stage
    n = max(1, world_size)
    psi, frozen = parameter_counts(cfg.model)
    bf16 = cfg.zero.precision == "bf16"
    # bf16 gradients accumulate in fp32; under ZeRO-1/2 an fp32 run's optimizer keeps its own fp32 master partition
    weight, grad, optim = (2, 4, 12) if bf16 else (4, 4, 12 if stage in (1, 2) else 8)
    parameters = (psi + frozen) * weight / (n if stage >= 3 else 1)
    gradients = psi * grad / (n if stage >= 2 else 1)
    optimizer = psi * optim / (n if stage >= 1 else 1)
    if cfg.zero.offload_optimizer:
        optimizer = 0.0
    if cfg.zero.offload_parameters:
        parameters = 0.0
    value_bytes = 2 if bf16 else 4
    from train.engine import bucket_sizes

    buffers = (bucket_sizes(cfg)[0] + (cfg.zero.allgather_bucket_size if stage in (1, 2) else 0)) * value_bytes
    buffers = min(buffers, 2 * psi * value_bytes)  # buckets never exceed the model
    if sequence < 1 or world_size % sequence:
        from conf.errors import ConfigError

        raise ConfigError(f"a sequence-parallel degree of {sequence} must divide the world size {world_size}")
    tokens = (token_budget or max(s.token_budget for s in cfg.curriculum.stages)) / sequence  # per rank
    m = cfg.model
    text = text_tokens if text_tokens is not None else m.text.max_tokens
    mlp_values = 2 * m.mlp_hidden / m.dim * (1 - 1 / m.mlp_chunks)  # per token, x dim: what tiling the MLP saves
    per_block = (ACTIVATION_VALUES_PER_TOKEN - mlp_values) * m.dim * tokens
    saved_blocks = m.depth * (m.dim * tokens if m.activation_checkpointing else per_block)
    recompute = per_block if m.activation_checkpointing else 0  # one block rebuilt during backward
    head_values = HEAD_VALUES_PER_TOKEN * (1 - 1 / m.loss_chunks)
    outside = (OUTSIDE_BLOCKS_VALUES_PER_TOKEN - head_values) * m.dim * tokens + 20 * m.text.dim * text * max(1, m.text.depth)
    saved = (saved_blocks + outside) * value_bytes
    all_to_all = 4 * m.dim * tokens if sequence // max(1, ring) > 1 else 0
    all_to_all += 8 * m.dim * tokens if ring > 1 else 0  # the ring's blocks in flight
    ema = 4 * psi / n  # every run keeps one (train.ema_decay), partitioned like the fp32 master weights
    gathered = 0.0
    if stage >= 3:
        from train.engine import two_blocks

        live = cfg.zero.max_live_parameters or two_blocks(cfg)
        gathered = min(psi + frozen, live) * weight
    encoder_bytes, not_counted = frozen_encoders(m)
    # Evaluation runs in the loop at its last step too (train/trainer.py evaluation_due), before the moments go.
    tracking = cfg.tracking
    in_loop = bool(tracking.video_every or tracking.eval_prompts or tracking.eval_clips)
    return MemoryEstimate(parameters, gradients, optimizer, buffers,
                          saved + (recompute + all_to_all) * value_bytes, saved, ema=ema, gathered=gathered,
                          encoders=encoder_bytes, trainable=psi, frozen=frozen, not_counted=not_counted,
                          sampling=(psi + frozen) * value_bytes, sampling_in_loop=in_loop,
                          moments=0.0 if cfg.zero.offload_optimizer else psi * 8 / (n if stage >= 1 else 1))


def gpu_memory_gib(gpu: str) -> float:
    """--gpu: a kind of GPU_MEMORY_GIB, or its memory in GiB."""
    from conf.errors import UserError, did_you_mean

    if gpu in GPU_MEMORY_GIB:
        return float(GPU_MEMORY_GIB[gpu])
    try:
        gib = float(gpu)
    except ValueError:
        raise UserError(f"--gpu {gpu}: not a GPU kind Kino knows ({', '.join(GPU_MEMORY_GIB)}){did_you_mean(gpu, GPU_MEMORY_GIB)}; "
                        f"or give its memory in GiB, e.g. --gpu 24") from None
    if gib <= 0:
        raise UserError(f"--gpu {gpu}: the GPU's memory in GiB must be positive")
    return gib


def main(argv: List[str] = None) -> int:
    from conf.errors import ArgumentParser, at_least

    parser = ArgumentParser(prog="python -m train.memory", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=1B zero.stage=3")
    parser.add_argument("--world-size", type=at_least(1, "the number of GPUs"), default=8)
    parser.add_argument("--gpu", default="H100", help=f"one of {', '.join(GPU_MEMORY_GIB)} or GiB as a number")
    parser.add_argument("--tokens", type=at_least(1, "a micro-batch's tokens"), default=None,
                        help="micro-batch tokens (default: largest stage budget)")
    parser.add_argument("--sequence", type=at_least(1, "the sequence-parallel degree"), default=None,
                        help="sequence-parallel degree N = Ulysses x ring: N ranks share each micro-batch "
                             "(docs/scaling.md); default parallel.sequence")
    parser.add_argument("--ring", type=at_least(1, "the ring degree"), default=None,
                        help="of N, the ring attention degree R (N / R is Ulysses'); default parallel.ring, or 1 "
                             "with --sequence")
    args = parser.parse_args(argv)
    from conf.schema import load_config

    cfg = load_config(args.overrides, check=False)
    cfg.parallel.check()  # the rest is not checked (a world other than the launcher's may be asked about)
    sequence = cfg.parallel.sequence if args.sequence is None else args.sequence
    ring = (cfg.parallel.ring if args.sequence is None else 1) if args.ring is None else args.ring
    if sequence % ring:
        from conf.errors import UserError

        raise UserError(f"--ring {ring} does not divide the sequence-parallel degree {sequence}")
    gib = gpu_memory_gib(args.gpu)
    result = estimate(cfg, args.world_size, args.tokens, sequence=sequence, ring=ring)
    frozen = f" and {result.frozen / 1e9:.2f}B frozen" if result.frozen else ""
    print(f"model {cfg.model.name}: {result.trainable / 1e9:.2f}B trainable{frozen} parameters; "
          f"ZeRO-{cfg.zero.stage}, {cfg.zero.precision}, {args.world_size} GPUs"
          f"{f' in sequence-parallel groups of {sequence}' if sequence > 1 else ''}"
          f"{f' (Ulysses {sequence // ring} x ring {ring})' if ring > 1 else ''}, "
          f"activation checkpointing {'on' if cfg.model.activation_checkpointing else 'off'}"
          f"{f', MLP in {cfg.model.mlp_chunks} chunks' if cfg.model.mlp_chunks > 1 else ''}"
          f"{f', head in {cfg.model.loss_chunks} chunks' if cfg.model.loss_chunks > 1 else ''}")
    notes = {"ema": "(fp32, this rank's 1/N of the trained parameters)",
             "gathered": "(ZeRO-3: parameters whole at once, zero.max_live_parameters)",
             "encoders": "(frozen: the text encoder, VAE and image encoder at model.text.dtype, "
                         "model.autoencoder.dtype and model.image.dtype)"}
    for name in MemoryEstimate.ROWS:
        print(f"  {name:<12} {getattr(result, name) / 2 ** 30:8.2f} GiB {notes.get(name, '')}".rstrip())
    for missing in result.not_counted:
        print(f"  not counted: {missing}")
    print(f"  {'peak':<12} {result.total / 2 ** 30:8.2f} GiB of {gib:.0f} GiB ({args.gpu}): the rows together, as "
          f"in backward")
    when = "in the loop (tracking.eval_prompts / eval_clips / video_every)" if result.sampling_in_loop else \
        "at the end of the run, the AdamW moments and EMA pieces freed"
    print(f"  {'sampling':<12} {result.sampling_peak / 2 ** 30:8.2f} GiB on the main rank, {when}: the training state "
          f"and the whole EMA model ({result.sampling / 2 ** 30:.2f} GiB in {cfg.zero.precision})")
    fits = result.fits(gib * 2 ** 30)
    print("fits" if fits else f"does NOT fit {result.advice()}")
    return 0 if fits else 1


if __name__ == "__main__":
    from conf.errors import run_command

    sys.exit(run_command("kino", main))
