"""Ring attention's pieces in one process (the ring across processes: tests/integration/test_sequence_parallel.py):
the tiled block kernel against plain attention per clip, forward and backward, and the cut of a ring's tokens by
attention cost."""
import pytest
import torch

from models.attention import varlen_attention
from train import ring_attention
from train.ring_attention import Ring, balanced_bounds


def _clips(lengths, heads=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lengths), heads, dim, generator=generator, dtype=torch.float64).float().requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize("tile", [7, 2048])
def test_one_rank_ring_attends_each_clip_alone_in_tiles_forward_and_backward(monkeypatch, tile):
    """Clips of 37, 5 and 64 tokens in tiles of 7: many tiles a clip, merged by the log-sum-exp, and the
    backward recomputed tile by tile from it, give plain per-clip attention's output and gradients."""
    monkeypatch.setattr(ring_attention, "TILE", tile)
    lengths = [37, 5, 64]
    cu = [0, 37, 42, 106]
    q, k, v = _clips(lengths)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    expected = varlen_attention(q, k, v, cu_t, cu_t, max(lengths), max(lengths), "reference")
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    got_out = ring_attention.ring_attention(q, k, v, Ring([0], 0, None, [0, cu[-1]], cu))
    got = torch.autograd.grad(got_out, (q, k, v), grad)
    assert torch.allclose(got_out, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_golden_a_tile_merged_without_rescaling_is_caught(monkeypatch):
    monkeypatch.setattr(ring_attention, "TILE", 7)
    monkeypatch.setattr(ring_attention, "merge", lambda out, lse, o, l: (out + o, torch.logaddexp(lse, l)))
    q, k, v = _clips([37])
    cu_t = torch.tensor([0, 37], dtype=torch.int32)
    expected = varlen_attention(q, k, v, cu_t, cu_t, 37, 37, "reference")
    got = ring_attention.ring_attention(q, k, v, Ring([0], 0, None, [0, 37], [0, 37]))
    assert (got - expected).abs().max() > 0.1


def _work(lengths, bounds, dim):
    cost = [n + 6 * dim for n in lengths for _ in range(n)]
    return [sum(cost[a:b]) for a, b in zip(bounds, bounds[1:])]


def test_a_ring_is_cut_by_attention_cost_not_by_token_count():
    """One long clip and many short ones on a ring of 4: by token count, the rank with the long clip does ~4x the
    work of the one with the short clips; cut by cost, every rank's work is within one token's cost of equal."""
    lengths, dim = [3000] + [100] * 30, 64
    bounds = balanced_bounds(lengths, 4, dim)
    assert bounds[0] == 0 and bounds[-1] == sum(lengths) and bounds == sorted(bounds)
    work = _work(lengths, bounds, dim)
    assert max(work) - min(work) <= 2 * (3000 + 6 * dim)
    even = [0, 1500, 3000, 4500, 6000]
    by_tokens = _work(lengths, even, dim)
    assert max(by_tokens) / min(by_tokens) > 3 and max(work) / min(work) < 1.01
    assert balanced_bounds([100], 4, dim) == [0, 25, 50, 75, 100]  # one clip: an even split
    assert balanced_bounds([3], 4, dim)[-1] == 3  # fewer tokens than ranks: some stretches are empty
