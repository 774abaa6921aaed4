"""Run under torchrun (gloo, CPU): does a sequence-parallel forward and backward reproduce one process's?

Every rank builds the same tiny model. The reference is one process's plain forward and backward of each group's
packed micro-batch (clips of mixed shapes, the first longer than a rank's share), averaged over the groups as data
parallelism does. The sequence-parallel run splits each micro-batch over its group, with the trainer's own loss
(`sequence_loss`), and averages gradients over all ranks: by hand, or by DeepSpeed's ZeRO-3 engine. Rank 0 writes
the worst relative differences of the loss and of every parameter gradient to the JSON file named by argv[1], for
each degree of argv[2] (comma-separated: several degrees share one launch, which costs more than the checks).

    torchrun --nproc_per_node=4 tests/integration/sequence_parallel_check.py out.json 2,4,1x4,2x2

A degree is Ulysses' alone (`4`), or `UxR`: Ulysses U times a ring of R (train/ring_attention.py). With a ring the
model has 6 heads, which neither 4 nor a ring of 4 divides; the joint (MM-DiT) blocks are left out (not built with a
ring), and the golden case plants a block whose log-sum-exp is not rescaled when merged.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from conf.schema import load_config  # noqa: E402
from models.dit import TextToVideoModel, text_conditioner  # noqa: E402
from train.engine import deepspeed_config, init_distributed  # noqa: E402
from train import ring_attention  # noqa: E402
from train.parallelize import apply_activation_checkpointing, apply_tiling  # noqa: E402
from train.sequence_parallel import (SequenceSplit, apply_sequence_parallel, per_clip_loss,  # noqa: E402
                                     sequence_layout, sequence_loss)

OWN_HEADS = SequenceSplit.own_heads
MERGE = ring_attention.merge


def _unrescaled_merge(out, lse, block_out, block_lse):
    """The planted bug: the running output is not rescaled to the merged log-sum-exp."""
    new = torch.logaddexp(lse, block_lse)
    take = torch.exp(block_lse - new).nan_to_num(0.0)
    return out + block_out * take[..., None], new

# (channels, frames, height, width) with patches [1, 4, 4]: 64, 16 and 4 tokens. With 2 ranks a share is 42
# tokens, with 4 it is 21: the first clip straddles two or three ranks.
SHAPES = [(3, 4, 16, 16), (3, 2, 8, 16), (3, 1, 8, 8)]
CAPTIONS = ["a red circle moving right", "a blue square", "green"]


# model.arch=wan as Wan 2.1 I2V, a superset of its text-to-video path: conditioning frames on the input channels, and
# image tokens (random here: the DiT reads tokens, CLIP runs outside it) in every block's cross-attention.
WAN_I2V = ["model.arch=wan", "model.ffn_dim=96", "model.frame_conditioning=true", "model.image.path=tokens-given",
           "model.image.dim=16", "model.image.tokens=5"]


def config(conditioning: str, ulysses: int, ring: int):
    """conditioning: cross_attention or joint (Kino's DiT), or wan (model.arch=wan, cross-attention to the caption
    and to each clip's image tokens: Wan 2.1 I2V)."""
    arch = WAN_I2V if conditioning == "wan" else [f"model.conditioning={conditioning}"]
    width = ["model.dim=64", "model.heads=4"] if ring == 1 else ["model.dim=72", "model.heads=6"]
    return load_config([*width, "model.depth=2", "model.text.dim=32", "model.text.depth=1",
                        "model.text.heads=2", *arch, "model.attention_backend=reference",
                        f"parallel.ulysses={ulysses}", f"parallel.ring={ring}", "launcher.procs_per_node=4",
                        "launcher.gpus_per_node=0"])


def parse_degree(spec: str):
    """`4` -> (4, 1); `2x2` -> (2, 2)."""
    ulysses, _, ring = spec.partition("x")
    return int(ulysses), int(ring or 1)


def micro_batch(group: int, model: TextToVideoModel, cfg):
    """A group's packed micro-batch: noisy latents, timesteps, captions and the velocity target."""
    generator = torch.Generator().manual_seed(100 + group)
    channels = model.dit.input_patch_dim // 16  # 4 x 4 patches: 3, or 7 with conditioning frames
    latents = [torch.randn((channels, *shape[1:]), generator=generator) for shape in SHAPES]
    targets = [torch.randn(shape, generator=generator) for shape in SHAPES]
    t = torch.rand(len(SHAPES), generator=generator)
    image = cfg.model.image
    text = text_conditioner(dataclasses.replace(cfg.model, image=dataclasses.replace(image, path=None))).batch(
        CAPTIONS[group % 2:] + CAPTIONS[:group % 2])
    if image.path:  # each clip's own image tokens, held whole by every rank as the caption's are
        text = dataclasses.replace(text, images=torch.randn(len(SHAPES), image.tokens, image.dim, generator=generator))
    return latents, t, text, model.dit.patchify(targets)


def reference(model, cfg, groups: int):
    """One process: each group's micro-batch in turn, the mean loss of each, gradients averaged over groups."""
    model.zero_grad()
    losses, per_clip = [], []
    for group in range(groups):
        latents, t, text, target = micro_batch(group, model, cfg)
        squared = (model(latents, t, text) - target).pow(2).mean(-1)
        (squared.mean() / groups).backward()
        losses.append(squared.mean().item())
        per_clip.append(per_clip_loss(squared.detach(), _tokens(model), None))
    return losses, per_clip, {name: p.grad.clone() for name, p in model.named_parameters()}


def _tokens(model):
    return [gt * gh * gw for gt, gh, gw in (model.dit.grid(s) for s in SHAPES)]


def sequence_parallel(model, cfg, layout, engine=None):
    """This rank's share of its group's micro-batch; returns the group's loss, per-clip losses and full gradients."""
    split = model.dit.sequence.split  # apply_sequence_parallel put it there
    latents, t, text, target = micro_batch(layout.data_rank, model, cfg)
    run = engine if engine is not None else model
    squared = (run(latents, t, text) - split.local(target)).pow(2).mean(-1)
    tokens = _tokens(model)
    loss = sequence_loss(squared, sum(tokens), layout.degree)
    if engine is not None:
        engine.backward(loss)
        from deepspeed.utils import safe_get_full_grad

        grads = {name: safe_get_full_grad(p).clone() for name, p in model.named_parameters()}
    else:
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)  # DeepSpeed's data-parallel average over every rank
            grads[name] = grad / layout.world_size
    group_loss = squared.detach().sum().reshape(1)
    dist.all_reduce(group_loss, group=layout.group)
    return (group_loss / sum(tokens)).item(), per_clip_loss(squared.detach(), tokens, split), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2].split(",")
    env = init_distributed()
    reports = {}
    for spec in specs:
        ulysses, ring = parse_degree(spec)
        reports[spec] = {"world_size": env.world_size, "degree": ulysses * ring, "ulysses": ulysses, "ring": ring,
                         "ranks": check(ulysses, ring, env)}
    if env.rank == 0:
        out.write_text(json.dumps(reports, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def check(ulysses: int, ring: int, env):
    """Every rank's results at Ulysses x ring (collective)."""
    layout = sequence_layout(ulysses * ring, env.rank, env.world_size, ring)
    results = {}
    for conditioning in ("cross_attention", "joint", "wan") if ring == 1 else ("cross_attention", "wan"):
        cfg = config(conditioning, ulysses, ring)
        torch.manual_seed(0)
        base = TextToVideoModel(cfg.model)
        with torch.no_grad():  # off adaLN-Zero's start, where most gradients are exactly zero
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        losses, per_clip, grads = reference(copy.deepcopy(base), cfg, layout.data_world)
        results[f"{conditioning}-zero-gradients"] = sorted(k for k, g in grads.items() if not g.abs().max() > 0)
        # With a ring, ZeRO-3 is left to the end-to-end ring run (test_sequence_parallel.py): it partitions the
        # parameters the same whatever splits the sequence, and each case here costs an engine's start.
        golden = "wrong heads" if ring == 1 else "unrescaled"
        for zero in (None, 3, "checkpointed", golden) if ring == 1 else (None, "checkpointed", golden):
            model = copy.deepcopy(base)
            apply_sequence_parallel(model, layout)  # first, as train/parallelize.py orders it
            engine = None
            if zero == "wrong heads":  # golden: every rank reads the caption's first heads; the check must see it
                SequenceSplit.own_heads = lambda self, x: x[:, :x.shape[1] // self.layout.degree]
            elif zero == "unrescaled":  # golden: the running result kept as it was when a block's lse is merged
                ring_attention.merge = _unrescaled_merge
            elif zero == "checkpointed":  # what a long run turns on with SP: tiling inside checkpointed blocks
                apply_tiling(model, mlp_chunks=3, loss_chunks=2)
                apply_activation_checkpointing(model)
            elif zero is not None:
                import deepspeed

                cfg.zero.stage = zero
                engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                  config=deepspeed_config(cfg, env.world_size, "cpu"))
            loss, clips, sp_grads = sequence_parallel(model, cfg, layout, engine)
            SequenceSplit.own_heads, ring_attention.merge = OWN_HEADS, MERGE
            name = f"{conditioning}-{({None: 'plain', 3: 'zero3', 'checkpointed': 'checkpointed'}).get(zero, 'golden')}"
            results[name] = {
                "loss": abs(loss - losses[layout.data_rank]) / abs(losses[layout.data_rank]),
                "per_clip": relative(clips, per_clip[layout.data_rank]),
                "grad": max(relative(sp_grads[k], grads[k]) for k in grads),
                "worst_parameter": max(grads, key=lambda k: relative(sp_grads[k], grads[k])),
                "parameters": len(grads), "missing": sorted(set(grads) - set(sp_grads)),
            }
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, results)
    return gathered

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
