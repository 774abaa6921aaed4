"""Sequence parallelism on paper: the tables of docs/scaling.md, derived from the model configs and stated
assumptions (no GPU needed). `python benchmarks/sp_model.py` prints them as markdown.

Ulysses (DeepSpeed-Ulysses, as Wan and Open-Sora-Plan use it): the N ranks of a group each hold 1/N of the tokens;
around each attention an all-to-all trades that for all tokens of 1/N of the heads. Per block and step, in bf16:
  self-attention  q, k, v before and the output after: 4 all-to-alls of (s/N) x d values per rank, forward;
  cross-attention q before and the output after: 2 more (the caption's k and v are computed whole, per head slice);
  backward repeats each once (their gradients), and activation checkpointing replays the forward: 3 x 6 in all.
Each all-to-all moves (N-1)/N of a rank's share. Attention FLOPs (DESIGN.md's formula): 4 s^2 d forward per block,
x3 with backward, +1 forward replayed under checkpointing, split over the N ranks. Matmul FLOPs: 2 x 14 d^2 per
token forward (qkv+o 4 d^2, cross q+o 2 d^2, MLP 8 d^2), the same x3 +1.

Ring attention and USP (`parallel.ulysses=U parallel.ring=R`, N = U x R; train/ring_attention.py): Ulysses inside
a node over NVLink, the ring across nodes. After Ulysses' all-to-all a rank holds s/R tokens of H/U heads, s/N x d
values a tensor. Each of the R - 1 ring steps sends the key and value block on (2 of s/N x d values) while the
block in hand is attended: twice in forward (with the replay under checkpointing) and, in backward, the block with
its key and value gradients (4): 8 x (s/N) x d x (R - 1) bytes/2 per block. The sends overlap the attention of
the block in hand, so only what they take beyond it is exposed.
"""
from __future__ import annotations

import math
from typing import Dict, List

H100_BF16 = 989e12  # dense peak, FLOP/s
MFU = 0.45  # what the compute runs at (issue 12's bar at 16k tokens)
NVLINK = 900e9  # bytes/s per GPU, one direction (H100 SXM, NVLink 4)
INFINIBAND = 400e9 / 8  # bytes/s per GPU: one 400 Gb/s NIC per GPU
ALL_TO_ALL_EFFICIENCY = 0.7  # share of link bandwidth an all-to-all reaches (NCCL, large messages)
BYTES = 2  # bf16

RING_EFFICIENCY = 0.8  # share of link bandwidth large point-to-point sends reach
GPUS_PER_NODE = 8

MODELS = {"1B": (1536, 24, 12), "3B": (2304, 28, 18), "7B": (3072, 36, 24)}  # dim, depth, heads (conf/model)
CONFIGS = {"1B": "1B", "3B": "3B", "7B": "7B", "Wan-14B": "wan_14B"}  # conf/model names
HEADS = {**{name: heads for name, (_, _, heads) in MODELS.items()}, "Wan-14B": 40}
TOKENS = [50_000, 100_000, 250_000, 500_000, 1_300_000]


def all_to_all_bytes(dim: int, tokens: int, ranks: int, group: int) -> float:
    """What one rank's all-to-alls move per block and training step (3 x 6 of its share, tokens / ranks, as the
    module's docstring counts them), each traded within a Ulysses group of `group`."""
    return 3 * 6 * (tokens / ranks) * dim * BYTES * (group - 1) / group


def per_block(dim: int, tokens: int, ranks: int) -> Dict[str, float]:
    """FLOPs and all-to-all bytes of one block for one rank, one training step, with checkpointing."""
    passes = 4  # forward, backward (x2), the forward replayed under checkpointing
    attention = passes * 4 * tokens ** 2 * dim / ranks
    matmul = passes * 2 * 14 * dim ** 2 * tokens / ranks
    all_to_all = all_to_all_bytes(dim, tokens, ranks, ranks)
    return {"attention": attention, "matmul": matmul, "all_to_all": all_to_all}


def efficiency(dim: int, tokens: int, ranks: int, bandwidth: float) -> float:
    """Compute time / (compute + all-to-all time): the all-to-alls sit on the critical path (not overlapped)."""
    block = per_block(dim, tokens, ranks)
    compute = (block["attention"] + block["matmul"]) / (H100_BF16 * MFU)
    communicate = block["all_to_all"] / (bandwidth * ALL_TO_ALL_EFFICIENCY)
    return compute / (compute + communicate)


def ulysses_degrees(heads: int) -> List[int]:
    return [n for n in range(2, heads + 1) if heads % n == 0]


def usp_degrees(heads: int, ranks: int) -> tuple:
    """(Ulysses, ring) for N ranks: the largest Ulysses degree that divides the heads and N and stays inside one
    node (NVLink), the rest as a ring."""
    ulysses = max(u for u in range(1, min(ranks, GPUS_PER_NODE) + 1) if heads % u == 0 and ranks % u == 0)
    return ulysses, ranks // ulysses


def ring_send_bytes(dim: int, tokens: int, ranks: int, ring: int) -> float:
    """What one rank's ring sends per block and training step (the module's docstring)."""
    return 8 * (tokens / ranks) * dim * BYTES * (ring - 1)


def usp_efficiency(dim: int, tokens: int, ulysses: int, ring: int) -> float:
    """Compute time / step time per block at Ulysses x ring: the all-to-alls on the critical path (NVLink inside a
    node), the ring's sends exposed only beyond the attention they overlap (NVLink while the group fits one node,
    InfiniBand past it)."""
    ranks = ulysses * ring
    block = per_block(dim, tokens, ranks)
    attention = block["attention"] / (H100_BF16 * MFU)
    compute = attention + block["matmul"] / (H100_BF16 * MFU)
    all_to_all = all_to_all_bytes(dim, tokens, ranks, ulysses) / (NVLINK * ALL_TO_ALL_EFFICIENCY)
    link = NVLINK if ranks <= GPUS_PER_NODE else INFINIBAND
    sends = ring_send_bytes(dim, tokens, ranks, ring) / (link * RING_EFFICIENCY)
    return compute / (compute + all_to_all + max(0.0, sends - attention))


def table_usp(tokens: int = 1_300_000, degrees=(8, 16, 32), gib: float = 80.0) -> str:
    """For a minute of 720p per group: the degrees to use at N = 8, 16, 32 (8-GPU nodes), what fits on 80 GB
    (train.memory: ZeRO-3 over the group, bf16, checkpointing, MLP and head tiled in 8) and the efficiency."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conf.schema import load_config
    from train.memory import estimate

    lines = ["| model (heads) | " + " | ".join(f"N={n}" for n in degrees) + " |", "|---|" + "---|" * len(degrees)]
    for name, config in CONFIGS.items():
        cfg = load_config([f"model={config}", "curriculum=t2v_3stage", "zero.stage=3", "zero.precision=bf16",
                           "model.activation_checkpointing=true", "model.mlp_chunks=8", "model.loss_chunks=8"],
                          check=False)
        cells = []
        for n in degrees:
            ulysses, ring = usp_degrees(HEADS[name], n)
            total = estimate(cfg, world_size=n, token_budget=tokens, sequence=n, ring=ring).total / 2 ** 30
            fits = "fits" if total <= 0.9 * gib else "does not fit"
            cells.append(f"U={ulysses} x R={ring}: {total:.0f} GiB {fits}, "
                         f"{usp_efficiency(cfg.model.dim, tokens, ulysses, ring):.1%}")
        lines.append(f"| {name} ({HEADS[name]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_ring_overlap(degrees=(2, 4, 8, 16)) -> str:
    """Whether a ring's sends hide behind attention: attention time / send time per block, over InfiniBand (a ring
    across nodes, Ulysses 8 inside each), 7B."""
    dim = MODELS["7B"][0]
    lines = ["| tokens | " + " | ".join(f"R={r}" for r in degrees) + " |", "|---|" + "---|" * len(degrees)]
    for tokens in TOKENS:
        cells = []
        for ring in degrees:
            ranks = 8 * ring
            attention = per_block(dim, tokens, ranks)["attention"] / (H100_BF16 * MFU)
            sends = ring_send_bytes(dim, tokens, ranks, ring) / (INFINIBAND * RING_EFFICIENCY)
            cells.append(f"{attention / sends:.1f}x")
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_volume() -> str:
    lines = ["| model | tokens | attention share of FLOPs | all-to-all per block per rank (N=8) | "
             "attention FLOPs per all-to-all byte (N=8) |", "|---|---|---|---|---|"]
    for name, (dim, _, _) in MODELS.items():
        for tokens in TOKENS:
            b = per_block(dim, tokens, 8)
            lines.append(f"| {name} | {tokens:,} | {b['attention'] / (b['attention'] + b['matmul']):.0%} | "
                         f"{b['all_to_all'] / 2 ** 20:,.0f} MiB | {b['attention'] / b['all_to_all']:,.0f} |")
    return "\n".join(lines)


def table_efficiency() -> str:
    lines = ["| model | tokens | N=8 NVLink | N=8 InfiniBand | N=16 InfiniBand | N=32 InfiniBand |",
             "|---|---|---|---|---|---|"]
    for name, (dim, _, _) in MODELS.items():
        for tokens in TOKENS:
            cells = [efficiency(dim, tokens, 8, NVLINK)] + [efficiency(dim, tokens, n, INFINIBAND) for n in (8, 16, 32)]
            lines.append(f"| {name} | {tokens:,} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")
    return "\n".join(lines)


def table_heads() -> str:
    lines = ["| model | heads | Ulysses degrees N (N divides the heads) | N = 8, 16, 32 |", "|---|---|---|---|"]
    for name, (_, _, heads) in MODELS.items():
        degrees = ulysses_degrees(heads)
        wanted = ", ".join(f"{n}: " + ("Ulysses" if n in degrees else "U={} x R={}".format(*usp_degrees(heads, n)))
                           for n in (8, 16, 32))
        lines.append(f"| {name} | {heads} | {', '.join(map(str, degrees))} | {wanted} |")
    return "\n".join(lines)


def table_weak_scaling(model: str = "7B", tokens_per_gpu: int = 40_000, sequence_ranks: int = 8) -> str:
    """Fixed tokens per GPU; groups of `sequence_ranks` (one node, NVLink) share a sequence; data parallelism over
    the groups (ZeRO-2 over InfiniBand: a reduce-scatter of the bf16 gradients and an all-gather of the bf16
    weights per step, each moving ~2 x params x (G-1)/G bytes per GPU, half of it hidden behind backward)."""
    dim, depth, _ = MODELS[model]
    params = depth * 14 * dim ** 2
    tokens = tokens_per_gpu * sequence_ranks
    block = per_block(dim, tokens, sequence_ranks)
    compute = depth * (block["attention"] + block["matmul"]) / (H100_BF16 * MFU)
    sequence = depth * block["all_to_all"] / (NVLINK * ALL_TO_ALL_EFFICIENCY)
    lines = ["| GPUs | data-parallel groups | step s | of which exposed gradient sync | tokens/s (all GPUs) | "
             "efficiency vs 8 GPUs |", "|---|---|---|---|---|---|"]
    base = None
    for gpus in (8, 16, 32, 64, 128, 256, 512, 1024):
        groups = gpus // sequence_ranks
        sync = 0.0 if groups == 1 else 0.5 * 2 * 2 * params * BYTES * (groups - 1) / groups / (INFINIBAND * 0.8)
        latency = 0.0 if groups == 1 else 2 * math.log2(groups) * 20e-6 * depth  # per-bucket ring latency
        step = compute + sequence + sync + latency
        rate = tokens * groups / step
        base = base or rate / gpus
        lines.append(f"| {gpus} | {groups} | {step:.2f} | {sync + latency:.2f} | {rate:,.0f} | "
                     f"{rate / gpus / base:.0%} |")
    return "\n".join(lines)


def table_fits(tokens_list=(864_000, 1_300_000), degrees=(8, 16, 32), gib: float = 80.0) -> str:
    """train.memory's estimate per GPU for one minute-long clip per sequence-parallel group: ZeRO-3 over the group,
    bf16, activation checkpointing on (one group: the world size is N)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conf.schema import load_config
    from train.memory import estimate

    lines = ["| model | tokens per clip | " + " | ".join(f"N={n}" for n in degrees) + " |",
             "|---|---|" + "---|" * len(degrees)]
    for name in MODELS:
        cfg = load_config([f"model={name}", "curriculum=t2v_3stage", "zero.stage=3", "zero.precision=bf16",
                           "model.activation_checkpointing=true"])
        for tokens in tokens_list:
            cells = []
            for n in degrees:
                total = estimate(cfg, world_size=n, token_budget=tokens, sequence=n).total / 2 ** 30
                cells.append(f"{total:.0f} GiB {'fits' if total <= 0.9 * gib else 'does not fit'}")
            lines.append(f"| {name} | {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    print("### All-to-all volume against attention FLOPs\n")
    print(table_volume())
    print("\n### Expected sequence-parallel efficiency (all-to-alls not overlapped)\n")
    print(table_efficiency())
    print("\n### Which degrees Ulysses can take\n")
    print(table_heads())
    print("\n### What fits on 80 GB GPUs (train.memory)\n")
    print(table_fits())
    print("\n### Ring attention and USP: degrees, memory and efficiency for a minute of 720p (1.3M tokens)\n")
    print(table_usp())
    print("\n### Ring sends against the attention they overlap (7B, Ulysses 8 in a node, ring over InfiniBand)\n")
    print(table_ring_overlap())
    print("\n### Weak scaling on paper: 7B, 40k tokens per GPU, SP = 8 within a node, ZeRO-2 across nodes\n")
    print(table_weak_scaling())


if __name__ == "__main__":
    main()
