import random

import numpy as np
import torch

from train.checkpoint import latest_checkpoint
from train.curriculum import Curriculum
from train.config import CurriculumConfig, StageConfig
from train.rng import RNGState


def test_rng_state_round_trip_reproduces_every_stream():
    state = RNGState(seed=3, rank=1)
    torch.randn(5, generator=state.generator), random.random(), np.random.rand()
    saved = state.state_dict()
    first = (torch.randn(4, generator=state.generator), torch.randn(2), random.random(), np.random.rand())
    other = RNGState(seed=99, rank=0)
    other.load_state_dict(saved)
    second = (torch.randn(4, generator=other.generator), torch.randn(2), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_ranks_draw_different_noise():
    a, b = RNGState(0, 0), RNGState(0, 1)
    assert not torch.equal(torch.randn(4, generator=a.generator), torch.randn(4, generator=b.generator))


def make_checkpoint(root, step, complete=True):
    path = root / f"step_{step}"
    (path / "engine").mkdir(parents=True)
    if complete:
        (path / "COMPLETE").write_text(f"{step}\n")
    return path


def test_latest_never_names_an_incomplete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)  # killed mid-save
    (tmp_path / ".partial_step_40").mkdir()
    (tmp_path / "latest").write_text("step_20\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_20"
    (tmp_path / "latest").write_text("step_30\n")  # never written before COMPLETE, but be safe
    assert latest_checkpoint(tmp_path) == tmp_path / "step_20"


def test_a_newer_complete_checkpoint_wins_when_latest_was_not_yet_moved(tmp_path):
    make_checkpoint(tmp_path, 10)
    (tmp_path / "latest").write_text("step_10\n")
    make_checkpoint(tmp_path, 20)  # crash between the rename and the `latest` update
    assert latest_checkpoint(tmp_path) == tmp_path / "step_20"


def test_curriculum_stages_and_schedules_are_functions_of_the_step():
    cur = Curriculum(CurriculumConfig(stages=[
        StageConfig(name="a", steps=10, lr=1.0, warmup_steps=5),
        StageConfig(name="b", steps=10, lr=0.5, schedule="cosine", min_lr_ratio=0.1)]))
    assert [cur.stage(s).name for s in (0, 9, 10, 19)] == ["a", "a", "b", "b"]
    assert cur.lr(0) == 0.2 and cur.lr(4) == 1.0 and cur.lr(9) == 1.0
    assert cur.lr(10) == 0.5 and abs(cur.lr(19) - (0.05 + 0.45 * 0.5 * (1 + np.cos(np.pi * 0.9)))) < 1e-12
    assert cur.state_dict(12) == {"stage_index": 1, "stage": "b", "step_in_stage": 2}


def test_noise_is_drawn_where_the_latents_are_and_resumes_exactly():
    """On the CPU the noise generator is the rank's generator itself (the stream CPU runs always drew). The CUDA
    generator's own round trip is in tests/gpu/test_cuda_hot_path.py (it needs a GPU)."""
    cpu = RNGState(seed=3, rank=1)
    assert cpu.noise_generator is cpu.generator
    state = RNGState(seed=3, rank=1)
    torch.randn(7, generator=state.noise_generator)
    saved = state.state_dict()
    first = torch.randn(5, generator=state.noise_generator, device="cpu")
    other = RNGState(seed=0, rank=0)
    other.load_state_dict(saved)
    assert torch.equal(first, torch.randn(5, generator=other.noise_generator, device="cpu"))
