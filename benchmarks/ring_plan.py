"""How the ring's host-side planning grows: the cut of a micro-batch by attention cost (`balanced_bounds`) and each
rank's clip overlaps for every ring step (`Ring.pairs`), in-process, for packed micro-batches of 10^3 to 10^6
clips. Both run once per forward on every rank (the cut is cached across layers), so they must stay near-linear in
clips. `python benchmarks/ring_plan.py` prints a markdown table.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.ring_attention import Ring, balanced_bounds  # noqa: E402


def clip_lengths(count: int, seed: int = 0):
    """Images (256 tokens) and clips of 1-60 s at 720p (3,600 tokens a latent frame), as a curriculum packs them."""
    rng = random.Random(seed)
    return [256 if rng.random() < 0.5 else 3600 * rng.randint(1, 16) for _ in range(count)]


def cut_per_token(lengths, parts: int, dim: int):
    """The baseline: the first version's cut, a cost for every token and a search over their running sum."""
    import torch

    cost = torch.cat([torch.full((n,), float(n + 6 * dim), dtype=torch.float64) for n in lengths])
    cumulative = torch.cumsum(cost, 0)
    targets = cumulative[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    return [0] + [int(i) + 1 for i in torch.searchsorted(cumulative, targets)] + [len(cost)]


def overlaps_scan(cu, q_range, k_range):
    """The baseline: the first version's overlaps, a scan of every clip of the micro-batch."""
    out = []
    for c in range(len(cu) - 1):
        qa, qb = max(cu[c], q_range[0]), min(cu[c + 1], q_range[1])
        ka, kb = max(cu[c], k_range[0]), min(cu[c + 1], k_range[1])
        if qa < qb and ka < kb:
            out.append((qa, qb, ka, kb))
    return out


def measure(count: int, ring: int = 32, baseline: bool = True) -> dict:
    lengths = clip_lengths(count)
    start = time.perf_counter()
    bounds = balanced_bounds(lengths, ring, 3072)
    cut = time.perf_counter() - start
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    start = time.perf_counter()
    pairs = 0
    for member in range(ring):  # every rank's plan: each of its R steps
        plan = Ring(list(range(ring)), member, None, bounds, cu)
        pairs += sum(len(plan.pairs(source)) for source in range(ring))
    overlaps = (time.perf_counter() - start) / ring  # one rank's
    result = {"clips": count, "tokens": cu[-1], "cut_s": cut, "overlaps_s": overlaps, "pairs": pairs,
              "cut_baseline_s": None, "overlaps_baseline_s": None}
    if baseline and count <= 1_000:  # a cost per token: 16M tokens is 128 MB of float64 already
        start = time.perf_counter()
        assert cut_per_token(lengths, ring, 3072)[-1] == cu[-1]
        result["cut_baseline_s"] = time.perf_counter() - start
    if baseline and count <= 10_000:
        start = time.perf_counter()
        for source in range(ring):
            overlaps_scan(cu, (bounds[0], bounds[1]), (bounds[source], bounds[source + 1]))
        result["overlaps_baseline_s"] = time.perf_counter() - start
    return result


def main() -> None:
    print("| clips | tokens | cut by cost (s) | baseline: a cost per token (s) | one rank's overlaps, 32 steps (s) | "
          "baseline: a scan of every clip (s) |")
    print("|---|---|---|---|---|---|")
    for count in (1_000, 10_000, 100_000, 1_000_000):
        r = measure(count)
        base = ["-" if r[k] is None else f"{r[k]:.4f}" for k in ("cut_baseline_s", "overlaps_baseline_s")]
        print(f"| {r['clips']:,} | {r['tokens']:,} | {r['cut_s']:.4f} | {base[0]} | {r['overlaps_s']:.4f} | "
              f"{base[1]} |")


if __name__ == "__main__":
    main()
