"""Ulysses sequence parallelism over packed sequences of clips of mixed shapes (`parallel.sequence=N`).

The world is split into groups of N consecutive ranks; data parallelism runs over the groups. The N ranks of a
group share one packed micro-batch and each computes a contiguous 1/N of its tokens (`shares`), so a clip may
straddle ranks. Every per-token tensor of the DiT (patches, position features, each token's clip, RoPE angles)
passes through the model's `sequence` module: `SequenceShare` stands in for it and keeps this rank's share, so
per-token modulation and RoPE stay those of each token's own clip. Attention needs a clip's every token: an
all-to-all trades the split of the sequence for a split of the heads (each rank then holds the whole sequence
for H/N heads), attention runs with the whole sequence's cu_seqlens, and a second all-to-all trades back.
Caption tokens are few and every rank holds all of them: each rank takes its own heads' slice of theirs.

Gradients: whatever every rank of a group computes alike (the caption encoder, the conditioning) gets from each
rank the part its own share used, and the collectives' backward carries the rest, so the sum over a group is the
micro-batch's gradient. Each rank's loss is its share's squared error over (tokens / N) (`sequence_loss`):
DeepSpeed's average over all ranks is then the average over groups of each micro-batch's mean loss, as without
sequence parallelism. ZeRO partitions over the whole world (DeepSpeed sees a plain data-parallel world).

Data: only a group's first rank (its leader) reads and encodes; it sends the latents to the rest of its group
(`share_batch`, `share_latents`). The data coordinator therefore sees one consumer per group, and the audit and
provenance are the leader's. Every rank of a group draws the same noise and timesteps: its generators are
seeded by the group, not the rank.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from models.dit import DiTBlock, JointBlock
from models.wan import WanBlock
from train import collectives
from train.ring_attention import Ring, balanced_bounds, clips_between, ring_attention


@dataclass
class SequenceLayout:
    """Where this rank stands: world = groups x degree, groups of consecutive ranks. A group of degree N = U x R:
    U consecutive ranks share a stretch of the tokens by heads (Ulysses, `ulysses_group`), and
    the R ranks with the same place in their Ulysses groups pass keys and values around a ring (`ring_group`)."""

    degree: int
    rank: int
    world_size: int
    group: Optional[object] = None  # this rank's process group (None when degree is 1)
    ring: int = 1
    ulysses_group: Optional[object] = None
    ring_group: Optional[object] = None

    @property
    def ulysses(self) -> int:
        return self.degree // self.ring

    @property
    def data_rank(self) -> int:  # the group's index: the data-parallel rank
        return self.rank // self.degree

    @property
    def data_world(self) -> int:  # the number of groups: the data-parallel world size
        return self.world_size // self.degree

    @property
    def member(self) -> int:  # this rank's place in its group
        return self.rank % self.degree

    @property
    def head_member(self) -> int:  # this rank's place in its Ulysses group: which heads it attends
        return self.member % self.ulysses

    @property
    def ring_member(self) -> int:  # this rank's place in its ring: which stretch of the tokens it holds
        return self.member // self.ulysses

    @property
    def ring_ranks(self) -> List[int]:  # the global ranks of this rank's ring, in ring order
        return [self.leader + r * self.ulysses + self.head_member for r in range(self.ring)]

    @property
    def ulysses_ranks(self) -> List[int]:  # the global ranks of this rank's Ulysses group
        return [self.leader + self.ring_member * self.ulysses + u for u in range(self.ulysses)]

    @property
    def leader(self) -> int:  # the global rank of the group's first member
        return self.data_rank * self.degree

    @property
    def is_leader(self) -> bool:
        return self.member == 0

    @property
    def parallel(self) -> bool:
        return self.degree > 1


def sequence_layout(degree: int, rank: int, world_size: int, ring: int = 1) -> SequenceLayout:
    """Collective (every rank creates every group, in the same order, as torch.distributed requires)."""
    if degree < 1 or world_size % degree:
        raise ValueError(f"parallel.sequence={degree} does not divide the world size {world_size}")
    if ring < 1 or degree % ring:
        raise ValueError(f"parallel.ring={ring} does not divide the sequence-parallel degree {degree}")
    layout = SequenceLayout(degree, rank, world_size, ring=ring)
    if degree == 1:
        return layout
    ulysses = degree // ring
    found = {}
    for first in range(0, world_size, degree):
        members = list(range(first, first + degree))
        found[tuple(members)] = dist.new_group(members)
        if ring > 1 and ulysses > 1:  # a ring alone, or Ulysses alone, is the group itself
            subgroups = [members[r * ulysses:(r + 1) * ulysses] for r in range(ring)]  # Ulysses: inside a node
            subgroups += [members[u::ulysses] for u in range(ulysses)]  # rings: across the Ulysses groups
            for ranks in subgroups:
                found[tuple(ranks)] = dist.new_group(ranks)
    group = found[tuple(range(layout.leader, layout.leader + degree))]
    layout = dataclasses.replace(layout, group=group)
    return dataclasses.replace(layout, ulysses_group=found.get(tuple(layout.ulysses_ranks), group),
                               ring_group=found.get(tuple(layout.ring_ranks), group))


def shares(total: int, degree: int) -> List[int]:
    """Tokens each member computes: contiguous, in member order, at most one apart."""
    return [total // degree + (member < total % degree) for member in range(degree)]


class SequenceSplit:
    """The group's split of the current micro-batch's video tokens; `SequenceShare` records its length each
    forward (activation checkpointing's recompute sees the same one). Without a ring, each member computes a
    contiguous, even share. With one, the ring's stretches are cut by attention cost (ring_attention.balanced_bounds:
    packed clips of very different lengths would otherwise give some ranks far more work), and each stretch is
    shared evenly by its Ulysses group; `plan` (the clips' tokens, before each forward) says where."""

    def __init__(self, layout: SequenceLayout, dim: int = 0):
        self.layout, self.dim = layout, dim
        self.total: Optional[int] = None
        self.cu: Optional[List[int]] = None  # with a ring: the current micro-batch's clip offsets (`plan`)
        self._ring_bounds: Optional[List[int]] = None
        self._host_offsets: dict = {}  # with a ring: the contexts' cu_seqlens on the host, read once a forward

    def plan(self, lengths: Sequence[int]) -> None:
        """With a ring, before each forward: the clips' tokens, and the cut they make (once for every layer)."""
        layout = self.layout
        self.cu = [0] + list(itertools.accumulate(lengths))
        self._host_offsets = {}
        stretches = balanced_bounds(lengths, layout.ring, self.dim)
        self._ring_bounds = [0]
        for r in range(layout.ring):
            self._ring_bounds += list(itertools.accumulate(shares(stretches[r + 1] - stretches[r], layout.ulysses),
                                                           initial=stretches[r]))[1:]

    def bounds(self, total: int) -> List[int]:
        """Each member's first token, and the end (degree + 1 offsets, member order)."""
        if self.layout.ring == 1 or self.cu is None or self.cu[-1] != total:
            return [0] + list(itertools.accumulate(shares(total, self.layout.degree)))
        return self._ring_bounds

    @property
    def shares(self) -> List[int]:
        bounds = self.bounds(self.total)
        return [b - a for a, b in zip(bounds, bounds[1:])]

    @property
    def head_shares(self) -> List[int]:
        """The tokens of each member of this rank's Ulysses group: what its all-to-alls trade."""
        u, r = self.layout.ulysses, self.layout.ring_member
        return self.shares[r * u:(r + 1) * u]

    def host_offsets(self, cu_seqlens: torch.Tensor) -> List[int]:
        """A cross-attention context's clip offsets (its cu_seqlens) on the host. Every block's cross-attention
        reads the same tensor (the caption's; Wan I2V's images have their own): the device is synced once a forward
        for each, not once a layer. `plan` forgets them; activation checkpointing's recompute reuses them."""
        key = (cu_seqlens.data_ptr(), cu_seqlens.numel())
        if key not in self._host_offsets:
            self._host_offsets[key] = cu_seqlens.tolist()
        return self._host_offsets[key]

    def ring(self) -> Ring:
        """This rank's ring over the current micro-batch: each member's stretch and the clips' offsets."""
        layout = self.layout
        return Ring(layout.ring_ranks, layout.ring_member, layout.ring_group, self.bounds(self.total)[::layout.ulysses],
                    self.cu)

    def local(self, per_token: torch.Tensor) -> torch.Tensor:
        """This rank's share of a per-token tensor of the whole micro-batch."""
        bounds = self.bounds(per_token.shape[0])
        return per_token[bounds[self.layout.member]:bounds[self.layout.member + 1]]

    def own_heads(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a (tokens, heads, head_dim) tensor every rank holds whole (the caption's)."""
        per_rank = x.shape[1] // self.layout.ulysses
        return x[:, self.layout.head_member * per_rank:(self.layout.head_member + 1) * per_rank]


class SequenceShare(nn.Module):
    """Stands in for the model's `WholeSequence`: keeps this rank's share of each per-token tensor."""

    def __init__(self, split: SequenceSplit):
        super().__init__()
        self.split = split

    def forward(self, per_token: torch.Tensor) -> torch.Tensor:
        self.split.total = per_token.shape[0]
        return self.split.local(per_token)


# -- the all-to-alls ----------------------------------------------------------------------------------------
def _sequence_to_heads(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """(local tokens, G, H, D) -> (all tokens, G, H/N, D): member j receives head block j of every share."""
    degree, n = len(sizes), x.shape[0]
    g, h, d = x.shape[1], x.shape[2] // degree, x.shape[3]
    send = x.reshape(n, g, degree, h, d).permute(2, 0, 1, 3, 4).contiguous()  # (N, n, G, H/N, D)
    out = x.new_empty((sum(sizes), g, h, d))
    collectives.all_to_all(out, send.reshape(degree * n, g, h, d), list(sizes), [n] * degree, group)
    return out


def _heads_to_sequence(y: torch.Tensor, sizes: List[int], member: int, group) -> torch.Tensor:
    """(all tokens, G, H/N, D) -> (local tokens, G, H, D): the inverse of `_sequence_to_heads`."""
    degree, n = len(sizes), sizes[member]
    g, h, d = y.shape[1:]
    out = y.new_empty((degree * n, g, h, d))
    collectives.all_to_all(out, y.contiguous(), [n] * degree, list(sizes), group)
    return out.reshape(degree, n, g, h, d).permute(1, 2, 0, 3, 4).reshape(n, g, degree * h, d)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, member, group):
        ctx.sizes, ctx.member, ctx.group = sizes, member, group
        return _sequence_to_heads(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad, ctx.sizes, ctx.member, ctx.group), None, None, None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, sizes, member, group):
        ctx.sizes, ctx.group = sizes, group
        return _heads_to_sequence(y, sizes, member, group)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad.contiguous(), ctx.sizes, ctx.group), None, None, None


class _GatherHeads(torch.autograd.Function):
    """(tokens, H/N, D) of every member -> (tokens, H, D) on each; backward sums the members' gradients and
    keeps this member's heads (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, member, degree, group):
        ctx.member, ctx.heads, ctx.group = member, x.shape[1], group
        parts = [torch.empty_like(x) for _ in range(degree)]
        collectives.all_gather(parts, x.contiguous(), group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = collectives.all_reduce(grad.contiguous(), grad.device, group=ctx.group)
        return grad[:, ctx.member * ctx.heads:(ctx.member + 1) * ctx.heads], None, None, None


@torch.compiler.disable  # the collectives break a compiled block's graph here, and only here
def to_heads(split: SequenceSplit, *tensors: torch.Tensor) -> List[torch.Tensor]:
    """Each (local tokens, H, D) tensor -> (all tokens, H/N, D), all of them in one all-to-all."""
    layout = split.layout
    if layout.ulysses == 1:  # a ring alone: every rank keeps its heads
        return list(tensors)
    stacked = _SequenceToHeads.apply(torch.stack(tensors, dim=1), split.head_shares, layout.head_member,
                                     layout.ulysses_group)
    return list(stacked.unbind(1))


@torch.compiler.disable
def to_sequence(split: SequenceSplit, y: torch.Tensor) -> torch.Tensor:
    layout = split.layout
    if layout.ulysses == 1:
        return y
    return _HeadsToSequence.apply(y[:, None], split.head_shares, layout.head_member, layout.ulysses_group)[:, 0]


@torch.compiler.disable
def gather_heads(split: SequenceSplit, x: torch.Tensor) -> torch.Tensor:
    layout = split.layout
    if layout.ulysses == 1:
        return x
    return _GatherHeads.apply(x, layout.head_member, layout.ulysses, layout.ulysses_group)


class SequenceParallelAttention(nn.Module):
    """Stands in for an `AttentionCore`: the video queries (and, in self-attention, keys and values) arrive as
    this rank's share of the tokens with every head. The Ulysses all-to-all gives this rank its ring stretch (the
    whole sequence, without a ring) for its heads; with a ring, self-attention's keys and values then travel around
    it (train/ring_attention.py). Cross-attention's keys and values come from the caption, which every rank holds
    whole: a ring stretch attends the captions of the clips it holds."""

    def __init__(self, inner: nn.Module, split: SequenceSplit, kv_sharded: bool):
        super().__init__()
        self.inner, self.split, self.kv_sharded = inner, split, kv_sharded

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int) -> torch.Tensor:
        ringed = self.split.layout.ring > 1
        if self.kv_sharded:
            q, k, v = to_heads(self.split, q, k, v)
            out = ring_self_attention(self.split, q, k, v) if ringed else \
                self.inner(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
        else:
            (q,) = to_heads(self.split, q)
            k, v = self.split.own_heads(k), self.split.own_heads(v)
            out = stretch_cross_attention(self.split, self.inner, q, k, v, cu_seqlens_k) if ringed else \
                self.inner(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
        return to_sequence(self.split, out)


# The ring's plan is host-side Python (the cut, bisection over the clips): compiled blocks break here, not inside it.
@torch.compiler.disable
def ring_self_attention(split: SequenceSplit, q, k, v) -> torch.Tensor:
    return ring_attention(q, k, v, split.ring())


@torch.compiler.disable
def stretch_cross_attention(split: SequenceSplit, inner: nn.Module, q, k, v, cu_seqlens_k) -> torch.Tensor:
    """Cross-attention of this ring stretch's queries to the captions (or images) of the clips it holds."""
    ring = split.ring()
    start, end = ring.stretch(ring.index)
    pieces = [(c, min(end, ring.cu[c + 1]) - max(start, ring.cu[c])) for c in clips_between(ring.cu, start, end)]
    if not pieces:
        return q.new_zeros(q.shape)
    first, last = pieces[0][0], pieces[-1][0]
    context = split.host_offsets(cu_seqlens_k)[first:last + 2]
    cu_q = torch.tensor([0] + list(itertools.accumulate(n for _, n in pieces)), dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([c - context[0] for c in context], dtype=torch.int32, device=q.device)
    return inner(q, k[context[0]:context[-1]], v[context[0]:context[-1]], cu_q, cu_k,
                 max(n for _, n in pieces), max(b - a for a, b in zip(context, context[1:])))


class SequenceParallelJointAttention(nn.Module):
    """Stands in for a `JointAttentionCore`: video tokens are split as in self-attention, caption tokens are held
    whole by every rank; each rank attends its heads of both, then gathers the caption's heads back."""

    def __init__(self, inner: nn.Module, split: SequenceSplit):
        super().__init__()
        self.inner, self.split = inner, split

    def forward(self, qv, kv, vv, qt, kt, vt, cu, text_cu, max_len: int, text_max: int, order):
        qv, kv, vv = to_heads(self.split, qv, kv, vv)
        qt, kt, vt = (self.split.own_heads(t) for t in (qt, kt, vt))
        video, text = self.inner(qv, kv, vv, qt, kt, vt, cu, text_cu, max_len, text_max, order)
        return to_sequence(self.split, video), gather_heads(self.split, text)


def apply_sequence_parallel(model: nn.Module, layout: SequenceLayout) -> SequenceSplit:
    """Split `model`'s DiT over `layout`'s group: its per-token tensors and the attention of every block. The
    caption encoder is left whole (every rank runs it). Parameter names do not change."""
    dit = model.dit
    if dit.cfg.heads % layout.ulysses:
        raise ValueError(f"model.heads={dit.cfg.heads} is not divisible by parallel.ulysses={layout.ulysses}")
    split = SequenceSplit(layout, dit.cfg.dim)
    dit.sequence = SequenceShare(split)
    if layout.ring > 1:  # the ring's cut needs each clip's length before the first per-token tensor is split
        dit.register_forward_pre_hook(functools.partial(_plan_split, split))
    for block in dit.blocks:
        if isinstance(block, DiTBlock):
            block.attn.core = SequenceParallelAttention(block.attn.core, split, kv_sharded=True)
            block.cross.core = SequenceParallelAttention(block.cross.core, split, kv_sharded=False)
        elif isinstance(block, WanBlock):
            block.attn1.core = SequenceParallelAttention(block.attn1.core, split, kv_sharded=True)
            block.attn2.core = SequenceParallelAttention(block.attn2.core, split, kv_sharded=False)
        elif isinstance(block, JointBlock):
            if layout.ring > 1:
                raise ValueError("parallel.ring > 1 with model.conditioning=joint: ring attention over a joint "
                                 "caption-and-video sequence is not built (docs/scaling.md); use parallel.ulysses")
            block.core = SequenceParallelJointAttention(block.core, split)
        else:
            raise TypeError(f"no sequence-parallel plan for {type(block).__name__}")
    return split


def _plan_split(split: SequenceSplit, dit: nn.Module, args) -> None:
    split.plan([math.prod(dit.grid(x.shape)) for x in args[0]])


# -- the trainer's side -------------------------------------------------------------------------------------
def sequence_loss(squared: torch.Tensor, total_tokens: int, degree: int) -> torch.Tensor:
    """This rank's loss from its share's per-token squared errors: its part of the micro-batch's mean, times N
    (see the module's docstring). Without sequence parallelism, the mean."""
    return squared.sum() / (total_tokens / degree)


def per_clip_loss(squared: torch.Tensor, tokens: Sequence[int], split: Optional[SequenceSplit],
                  counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Each clip's mean squared error, from this rank's share of the tokens, summed over the group (a clip may
    straddle ranks). `counts`: the tokens of each clip the loss counts, where not all (`squared` is zero at the
    others: a conditioning frame's). Stays on the device."""
    if split is None and counts is None:
        return torch.stack([s.mean() for s in torch.split(squared, list(tokens))])
    counts = list(tokens) if counts is None else list(counts)
    if split is None:
        sums = torch.stack([s.sum() for s in torch.split(squared, list(tokens))])
        return sums / torch.tensor(counts, dtype=squared.dtype).to(squared.device, non_blocking=True)
    device = squared.device
    clips = torch.repeat_interleave(torch.arange(len(tokens)), torch.tensor(list(tokens)))
    local = split.local(clips).to(device, non_blocking=True)
    sums = torch.zeros(len(tokens), dtype=squared.dtype, device=device).index_add_(0, local, squared)
    sums = collectives.all_reduce(sums, device, group=split.layout.group)
    return sums / torch.tensor(counts, dtype=squared.dtype).to(device, non_blocking=True)


def share_batch(batch, layout: SequenceLayout):
    """The leader's micro-batch for every member: the leader passes its batch, the others None. The others get
    its clips' metadata without their pixels (`share_latents` sends what the model needs)."""
    if not layout.parallel:
        return batch
    light = None
    if layout.is_leader:
        light = dataclasses.replace(batch, clips=[dataclasses.replace(c, video=torch.empty(0, dtype=torch.uint8))
                                                  for c in batch.clips], dropped=[])
    message = [light]
    dist.broadcast_object_list(message, src=layout.leader, group=layout.group)
    return batch if layout.is_leader else message[0]


def share_latents(latents: Optional[List[torch.Tensor]], layout: SequenceLayout,
                  device: torch.device) -> List[torch.Tensor]:
    """The leader's encoded clips on every member (the others pass None): one encoding per group, and every
    member trains on exactly the same latents."""
    if not layout.parallel:
        return latents
    if layout.is_leader:  # a broadcast sends storage as laid out: a permuted view would arrive scrambled
        latents = [x.contiguous() for x in latents]
    shapes = [[(tuple(x.shape), x.dtype) for x in latents] if layout.is_leader else None]
    dist.broadcast_object_list(shapes, src=layout.leader, group=layout.group)
    if not layout.is_leader:
        latents = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes[0]]
    for x in latents:
        collectives.broadcast(x, layout.leader, layout.group)
    return latents


def share_rng_state(rng, layout: SequenceLayout) -> None:
    """Every member takes its leader's random state: after a resume onto another layout, the members of a new
    group may have restored different ones, and a group must draw one noise."""
    if not layout.parallel:
        return
    state = [rng.state_dict() if layout.is_leader else None]
    dist.broadcast_object_list(state, src=layout.leader, group=layout.group)
    if not layout.is_leader:
        rng.load_state_dict(state[0])
