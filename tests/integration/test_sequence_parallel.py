"""Ulysses sequence parallelism on real gloo process groups (CPU): the split model reproduces one process's loss,
per-clip losses and every parameter gradient, plain and under DeepSpeed ZeRO-3, for Kino's DiT (cross and joint
conditioning) and model.arch=wan as Wan 2.1 I2V, image tokens included (tests/integration/sequence_parallel_check.py
does the work under torchrun), and with tiling inside activation-checkpointed blocks, whose recompute replays the
all-to-alls in backward."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.forked_ranks import run_ranks

TOLERANCE = 1e-5  # fp32; what is compared differs only in summation order
GOLDEN_AT_LEAST = 1e-2  # a rank reading the wrong heads of the caption


# A degree is Ulysses' alone ("4") or Ulysses x ring ("2x2"); with a ring the model has 6 heads, which neither 4
# nor a ring of 4 divides, and the first clip straddles every rank of the ring of 4 (sequence_parallel_check.py).
@pytest.mark.parametrize("processes, degrees", [(2, ("2", "1x2")), (4, ("4", "1x4", "2x2"))])
def test_sequence_parallel_reproduces_one_process_loss_and_gradients(tmp_path, processes, degrees):
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / "tests" / "integration" / "sequence_parallel_check.py"), str(out),
               ",".join(degrees)]
    result = run_ranks(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert sorted(reports) == sorted(degrees)
    for degree, report in reports.items():
        assert report["world_size"] == processes and len(report["ranks"]) == processes
        assert_equivalent(report["ranks"], ringed=report["ring"] > 1)


def assert_equivalent(ranks, ringed: bool):
    # Kino's DiT with cross-attention or joint (MM-DiT) blocks, and model.arch=wan (its own blocks, I2V's images).
    # A ring is not built for joint blocks (refused before a run starts).
    conditionings = ("cross_attention", "wan") if ringed else ("cross_attention", "joint", "wan")
    for rank in ranks:
        # Every gradient compared is non-zero in the reference (weights moved off adaLN-Zero's start), except the
        # last joint block's caption queries, which nothing reads.
        assert rank["cross_attention-zero-gradients"] == []
        assert ringed or rank["joint-zero-gradients"] == ["dit.blocks.1.streams.text.q_norm.weight"]
        assert rank["wan-zero-gradients"] == []
        for conditioning in conditionings:
            for zero in ("plain", "checkpointed") if ringed else ("plain", "zero3", "checkpointed"):
                case = rank[f"{conditioning}-{zero}"]
                assert case["missing"] == [] and case["parameters"] > 50
                assert case["loss"] < TOLERANCE and case["per_clip"] < TOLERANCE, (conditioning, zero, case)
                assert case["grad"] < TOLERANCE, (conditioning, zero, case)
            # Golden: without a ring every rank reads the caption's first heads; with one, a block's log-sum-exp is
            # merged without rescaling the running result. Either must be seen.
            golden = rank[f"{conditioning}-golden"]
            assert golden["grad"] > GOLDEN_AT_LEAST, golden


# -- end to end, through `python -m train` ------------------------------------------------------------------
def _losses(run_dir):
    from tests.integration.test_training import metrics

    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


def _keys_by_step(run_dir):
    from train.provenance import read_trained_keys

    return [(record["step"], record["keys"]) for record in read_trained_keys(run_dir)]


# Both stages train every conditioning mode (models/conditioning.py) beside text-to-video: the equivalence below
# holds for each (given frames, their mask, and a loss over the generated frames only).
EVERY_MODE = ["curriculum=demo", "model.frame_conditioning=true"] + [
    f"{'' if mode == 'text' else '+'}curriculum.stages.{i}.conditioning.{mode}={share}" for i in (0, 1)
    for mode, share in (("text", 0.25), ("first_frame", 0.15), ("last_frame", 0.15), ("first_last", 0.15),
                        ("extend", 0.15), ("extend_backward", 0.15))]


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, tiny_dataset):
    from tests.integration.test_training import torchrun

    run_dir = tmp_path_factory.mktemp("sp") / "one_rank"
    torchrun(run_dir, tiny_dataset, "zero.stage=3", *EVERY_MODE, nproc=1)
    return run_dir


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_dataset):
    from tests.integration.test_training import torchrun

    run_dir = tmp_path_factory.mktemp("sp") / "two_ranks"
    # With what a long run turns on besides: activation checkpointing and tiling (same math, other memory).
    result = torchrun(run_dir, tiny_dataset, "zero.stage=3", "parallel.sequence=2", *EVERY_MODE,
                      "model.activation_checkpointing=true", "model.mlp_chunks=2", "model.loss_chunks=2")
    assert "1 sequence-parallel group(s) of 2" in result.stdout
    return run_dir


def test_two_ranks_at_sp2_train_the_batches_and_losses_of_one_rank(one_rank_run, two_rank_run):
    """Same batches in the same order (provenance), same losses to fp32 summation order, over a stage change
    that re-buckets, under ZeRO-3."""
    assert _keys_by_step(two_rank_run) == _keys_by_step(one_rank_run)
    one, two = _losses(one_rank_run), _losses(two_rank_run)
    assert len(one) == len(two) == 8
    assert two == pytest.approx(one, rel=1e-5)
    # Only the group's leader read, audited and recorded: the audit counts each trained sample once.
    audit = json.loads((two_rank_run / "checkpoints" / "step_8" / "audit.json").read_text())
    assert sum(audit["license_totals"].values()) == sum(len(keys) for _, keys in _keys_by_step(two_rank_run))


def test_four_ranks_on_a_ring_of_four_train_the_batches_and_losses_of_one_rank(one_rank_run, tiny_dataset, tmp_path):
    """Ring attention alone, at a degree the model's 2 heads do not divide (Ulysses could not), every mode, ZeRO-3:
    `python -m train experiment=demo model.heads=2 parallel.ulysses=1 parallel.ring=4` on 4 ranks."""
    from tests.integration.test_training import torchrun

    run_dir = tmp_path / "ring4"
    result = torchrun(run_dir, tiny_dataset, "zero.stage=3", "parallel.ulysses=1", "parallel.ring=4", *EVERY_MODE,
                      nproc=4)
    assert "1 sequence-parallel group(s) of 4 (Ulysses 1 x ring 4)" in result.stdout
    assert _keys_by_step(run_dir) == _keys_by_step(one_rank_run)
    one, ring = _losses(one_rank_run), _losses(run_dir)
    assert len(ring) == 8 and ring == pytest.approx(one, rel=1e-4)
    state = json.loads((run_dir / "checkpoints" / "step_8" / "train_state.json").read_text())
    assert state["sequence_degrees"] == {"ulysses": 1, "ring": 4}


def test_a_two_rank_sp_run_stops_resumes_and_continues_bit_exactly(two_rank_run, tiny_dataset, tmp_path):
    import torch

    from tests.integration.test_training import torchrun

    interrupted = tmp_path / "interrupted"
    common = ("zero.stage=3", "parallel.sequence=2", *EVERY_MODE, "model.activation_checkpointing=true",
              "model.mlp_chunks=2", "model.loss_chunks=2")
    torchrun(interrupted, tiny_dataset, *common, "train.stop_after_steps=3")
    second = torchrun(interrupted, tiny_dataset, *common)
    assert "resuming from" in second.stdout and "dealt out anew" not in second.stdout
    assert _losses(interrupted) == _losses(two_rank_run)
    assert _keys_by_step(interrupted) == _keys_by_step(two_rank_run)
    from tests.conftest import assert_same_ema

    assert_same_ema(two_rank_run / "checkpoints" / "step_8", interrupted / "checkpoints" / "step_8")
    from tests.exactly_once import assert_exactly_once

    assert_exactly_once(interrupted)


@pytest.mark.parametrize("first, then", [((2, "parallel.sequence=2"), (1, "parallel.sequence=1")),
                                         ((2, "parallel.sequence=1"), (2, "parallel.ring=2"))])
def test_a_run_resumes_onto_another_world_size_or_degree_without_repeating_data(tiny_dataset, tmp_path, first, then):
    """(processes, the sequence-parallel degrees) before and after the stop: from Ulysses 2 onto 1 rank, and from
    data parallelism onto a ring of 2. The data plan is dealt out anew, each sample still trained once per epoch,
    the new groups draw one noise, and the engine state loaded is the one saved."""
    from tests.exactly_once import assert_exactly_once
    from tests.integration.test_training import assert_same_engine_state, probed

    run_dir = tmp_path / "relaid"
    common = ("data.chunk_samples=2",)
    probed(run_dir, tiny_dataset, tmp_path / "first", *common, "train.stop_after_steps=3", first[1], nproc=first[0])
    result = probed(run_dir, tiny_dataset, tmp_path / "then", *common, "train.stop_after_steps=2", then[1],
                    nproc=then[0])
    assert "resuming from" in result.stdout and "dealt out anew" in result.stdout
    assert_same_engine_state(tmp_path / "first.final.pt", tmp_path / "then.resumed.pt")
    records = _keys_by_step(run_dir)
    assert sorted({step for step, _ in records}) == [1, 2, 3, 4, 5]
    assert_exactly_once(run_dir)
    # The audit (the leader's alone under SP) counts what provenance recorded, each trained sample once.
    audit = json.loads((run_dir / "checkpoints" / "step_5" / "audit.json").read_text())
    assert sum(audit["license_totals"].values()) == sum(len(keys) for _, keys in records)
    assert all(math.isfinite(loss) for loss in _losses(run_dir))


def test_sequence_parallel_degrees_that_cannot_split_are_rejected_before_any_process_starts(tiny_dataset, tmp_path):
    command = [sys.executable, "-m", "train", "experiment=demo", f"data.root={tiny_dataset}",
               f"train.run_dir={tmp_path}", "model.heads=4", "parallel.sequence=3"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, WORLD_SIZE="3"))
    assert result.returncode == 2 and "parallel.sequence=3 does not divide model.heads=4" in result.stderr
    result = subprocess.run(command[:-2] + ["model.heads=4", "parallel.sequence=2"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, WORLD_SIZE="3"))
    assert result.returncode == 2 and "does not divide the world size 3" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
