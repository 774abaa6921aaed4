"""Ring attention over packed clips of mixed lengths (`parallel.ring=R`), forward and backward.

The R ranks of a ring each hold a contiguous stretch of the packed video tokens (a clip may straddle ranks) with
the same heads. Each rank keeps its queries and passes its keys and values around the ring: at step s it attends
its queries to the block that started on rank (r - s) mod R, and merges that block's partial result into its own
by the log-sum-exp (online softmax), so after R steps every query has seen every key of its own clip and no other.
The next block is sent and received (isend/irecv) while the current one is computed.

Backward runs the same ring: each rank recomputes each block's probabilities from the saved log-sum-exp, keeps
its queries' gradient, and sends the block's key and value gradients on with the block, so that after R steps
they arrive back at the rank that owns those keys.

A block's work is done per clip that both sides hold (`_overlaps`), in tiles of queries and keys (`TILE`) with
fp32 scores and sums: exact for the varlen layout at any block size, with no mask across clips, and bounded in
memory at any clip length. Attention is bidirectional within a clip, so a query's cost
is its clip's length wherever the keys are: `balanced_bounds` splits the ring by that cost, not by token count.
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


def balanced_bounds(lengths: Sequence[int], parts: int, dim: int) -> List[int]:
    """Token offsets (parts + 1) splitting packed clips of `lengths` into contiguous stretches of equal work. A
    token's work: its attention (scores and the weighted sum: 4 x its clip's length x the width, in any layout) and
    everything else a block does per token (projections and the MLP: about 24 x width^2), so the cost of a token of
    a clip of length L is proportional to L + 6 x dim. With one clip, the split is even. O(clips x log clips): a
    token's cost is its clip's, so each cut is found among the clips, then within one."""
    starts = [0] + list(itertools.accumulate(lengths))
    if not lengths:
        return [0] * (parts + 1)
    costs = [float(n + 6 * dim) for n in lengths]
    before = [0.0] + list(itertools.accumulate(n * c for n, c in zip(lengths, costs)))  # cost before each clip
    bounds = [0]
    for part in range(1, parts):
        target = before[-1] * part / parts
        clip = min(max(bisect.bisect_right(before, target) - 1, 0), len(lengths) - 1)
        inside = math.ceil((target - before[clip]) / costs[clip] - 1e-9)  # tokens of `clip` before the cut
        bounds.append(max(bounds[-1], min(starts[clip] + max(inside, 0), starts[-1])))
    return bounds + [starts[-1]]


def clips_between(cu: Sequence[int], start: int, end: int) -> range:
    """The clips (indices into cu's offsets) that tokens [start, end) touch; O(log clips)."""
    if start >= end:
        return range(0)
    return range(bisect.bisect_right(cu, start) - 1, bisect.bisect_left(cu, end))


def _overlaps(cu: Sequence[int], q_range: Tuple[int, int], k_range: Tuple[int, int]):
    """For each clip that both token ranges touch: (q start, q end, k start, k end), local to each range."""
    out = []
    queries, keys = clips_between(cu, *q_range), clips_between(cu, *k_range)
    for c in range(max(queries.start, keys.start), min(queries.stop, keys.stop)):
        lo, hi = cu[c], cu[c + 1]
        qa, qb = max(lo, q_range[0]), min(hi, q_range[1])
        ka, kb = max(lo, k_range[0]), min(hi, k_range[1])
        if qa < qb and ka < kb:
            out.append((qa - q_range[0], qb - q_range[0], ka - k_range[0], kb - k_range[0]))
    return out


# Queries and keys per tile of a block's work: the fp32 scores of one tile (heads x TILE x TILE) are all that is
# held at once, whatever the clip's length (a minute-long clip's stretch is hundreds of thousands of tokens).
TILE = 2048


def _tiles(start: int, end: int, size: int):
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def block_forward(q, k, v, pairs, scale: float, tile: int = None):
    """One block's attention for the clips in `pairs`: (out (n, H, D) fp32 normalised within the block, lse (n, H)
    fp32; -inf where a query has no key in the block). Tile by tile, merged by the log-sum-exp."""
    tile = tile or TILE
    n, heads, _ = q.shape
    out = torch.zeros(n, heads, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((n, heads), float("-inf"), dtype=torch.float32, device=q.device)
    for qa, qb, ka, kb in pairs:
        for ta, tb in _tiles(qa, qb, tile):
            tile_out, tile_lse = out[ta:tb], lse[ta:tb]
            for ua, ub in _tiles(ka, kb, tile):
                scores = torch.einsum("qhd,khd->hqk", q[ta:tb].float(), k[ua:ub].float()) * scale
                part_lse = torch.logsumexp(scores, dim=-1)  # (H, q)
                probs = torch.exp(scores - part_lse[..., None])
                part_out = torch.einsum("hqk,khd->qhd", probs, v[ua:ub].float())
                tile_out, tile_lse = merge(tile_out, tile_lse, part_out, part_lse.transpose(0, 1))
            out[ta:tb], lse[ta:tb] = tile_out, tile_lse
    return out, lse


def merge(out, lse, block_out, block_lse):
    """Online softmax: the running (out, lse) and a block's, as if attended together."""
    new = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # no key yet on either side: weights 0
    keep = torch.exp(lse - safe).masked_fill(torch.isinf(new), 0.0)
    take = torch.exp(block_lse - safe).masked_fill(torch.isinf(new), 0.0)
    return out * keep[..., None] + block_out * take[..., None], new


def block_backward(q, k, v, grad_out, lse, delta, pairs, scale: float, tile: int = None):
    """Gradients of one block from the final lse: (dq, dk, dv) fp32, the block's share of each, tile by tile."""
    tile = tile or TILE
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for qa, qb, ka, kb in pairs:
        for ta, tb in _tiles(qa, qb, tile):
            qf, go = q[ta:tb].float(), grad_out[ta:tb].float()
            rows_lse, rows_delta = lse[ta:tb].transpose(0, 1)[..., None], delta[ta:tb].transpose(0, 1)[..., None]
            for ua, ub in _tiles(ka, kb, tile):
                kf, vf = k[ua:ub].float(), v[ua:ub].float()
                probs = torch.exp(torch.einsum("qhd,khd->hqk", qf, kf) * scale - rows_lse)
                dv[ua:ub] += torch.einsum("hqk,qhd->khd", probs, go)
                dscores = probs * (torch.einsum("qhd,khd->hqk", go, vf) - rows_delta)
                dq[ta:tb] += torch.einsum("hqk,khd->qhd", dscores, kf) * scale
                dk[ua:ub] += torch.einsum("hqk,qhd->khd", dscores, qf) * scale
    return dq, dk, dv


class Ring:
    """This rank's place in its ring: `ranks` the ring's global ranks in ring order, `bounds` each member's token
    stretch of the packed sequence (R + 1 offsets), `cu` the clips' offsets in the whole packed sequence."""

    def __init__(self, ranks: Sequence[int], index: int, group, bounds: Sequence[int], cu: Sequence[int]):
        self.ranks, self.index, self.group = list(ranks), index, group
        self.bounds, self.cu = list(bounds), list(cu)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def stretch(self, member: int) -> Tuple[int, int]:
        return self.bounds[member], self.bounds[member + 1]

    def pairs(self, source: int):
        """The clip overlaps of this rank's queries with member `source`'s keys."""
        return _overlaps(self.cu, self.stretch(self.index), self.stretch(source))

    def shift(self, tensors: Sequence[torch.Tensor], source: int, tag: int = 0) -> Tuple[List[torch.Tensor], list]:
        """Start sending `tensors` (member `source`'s block) to the next rank and receiving the previous rank's
        (member `source - 1`'s); returns the receive buffers and the requests to wait on. `tag` keeps a block's
        gradients apart from the next block, which travel between the same two ranks at once."""
        incoming = (source - 1) % self.size
        rows = self.bounds[incoming + 1] - self.bounds[incoming]
        buffers = [t.new_empty((rows, *t.shape[1:])) for t in tensors]
        nxt, prev = self.ranks[(self.index + 1) % self.size], self.ranks[(self.index - 1) % self.size]
        ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, prev, self.group, tag) for b in buffers]
        return buffers, dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _around(ring: Ring, block):
    """Every member's block in ring order, this rank's own first: (block, its member). While the caller works on
    one, the next is on its way from the previous rank."""
    source = ring.index
    for step in range(ring.size):
        pending = ring.shift(block, source) if step < ring.size - 1 else None
        yield block, source
        if pending is not None:
            _wait(pending[1])
            block, source = tuple(pending[0]), (source - 1) % ring.size


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring):
        scale = q.shape[-1] ** -0.5
        out = lse = None
        for block, source in _around(ring, (k, v)):
            block_out, block_lse = block_forward(q, *block, ring.pairs(source), scale)
            out, lse = (block_out, block_lse) if out is None else merge(out, lse, block_out, block_lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale = ring, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        delta = (grad_out.float() * out.float()).sum(-1)  # (n, H): rowsum(dO * O)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = dv = None
        for block, source in _around(ring, (k, v)):
            bq, bk, bv = block_backward(q, *block, grad_out, lse, delta, ring.pairs(source), scale)
            dq += bq
            dk, dv = (bk, bv) if dk is None else (dk + bk, dv + bv)
            # The block's key and value gradients travel with it; the last pass brings them home.
            if ring.size > 1:
                grads, requests = ring.shift((dk, dv), source, tag=1)
                _wait(requests)
                dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


@torch.compiler.disable  # point-to-point sends break a compiled graph here
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Attention of this rank's queries over every key of their own clips, the keys spread around `ring`:
    (n, H, D) -> (n, H, D), n this rank's stretch of the packed sequence."""
    return _RingAttention.apply(q, k, v, ring)
