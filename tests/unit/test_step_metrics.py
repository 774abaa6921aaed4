"""The metrics row of a step (train/tracking.py `step_metrics`): a pure function of the step's outcome and its
sums over ranks."""
import pytest
import torch

from data.batch import ConsumerSnapshot, PackedBatch, PreparedClip
from train.tracking import StepOutcome, StepResult, StepTotals, step_metrics

CONTEXT = dict(step=7, stage="low", token_budget=100, lr=1e-4, step_time=2.0, world_size=2, accumulation=1,
               peak_flops=1e12, grad_norm=0.5, nonfinite_total=1, eta_s=30.0, dropped={"too_short": 2})


def batch(*shapes):
    clips = [PreparedClip(torch.zeros(*shape, 3, dtype=torch.uint8), "", f"k{i}", "s.tar", {}, 10, (0, 0, i))
             for i, shape in enumerate(shapes)]
    return PackedBatch(clips, [], "rank0-worker0", ConsumerSnapshot(stage=[]))


def test_a_trained_step_reports_loss_per_token_throughput_and_losses_by_timestep_and_bucket():
    outcome = StepOutcome([StepResult(torch.tensor([True]), 20, loss_sum=torch.tensor(3.0), flops=5e11, per_sample_loss=torch.tensor([0.1, 0.3]),
                                      timesteps=torch.tensor([0.1, 0.9]))],
                          [batch((4, 8, 8), (1, 8, 16))], data_time=0.4, trained=True)
    row = step_metrics(outcome, StepTotals(loss_sum=6.0, tokens=40, flops=1e12, data_time=0.8), **CONTEXT)
    assert row["loss"] == pytest.approx(6.0 / 40) and row["tokens_per_s"] == pytest.approx(20.0)
    assert row["samples_per_s"] == pytest.approx(2 * 2 / 2.0)
    assert row["budget_unused_frac"] == pytest.approx(1 - 40 / 200)
    assert row["data_wait_frac"] == pytest.approx(0.8 / 2 / 2.0)
    assert row["mfu"] == pytest.approx(1e12 / (2.0 * 1e12 * 2))
    assert row["loss_t0"] == pytest.approx(0.1) and row["loss_t3"] == pytest.approx(0.3)
    assert row["loss_bucket/4x8x8"] == pytest.approx(0.1) and row["loss_bucket/1x8x16"] == pytest.approx(0.3)
    assert row["dropped"] == {"too_short": 2} and row["step"] == 7 and row["stage"] == "low"


def test_a_skipped_step_has_no_loss_and_counts_nothing_it_did_not_train():
    outcome = StepOutcome([StepResult(torch.tensor([True]), 20, loss_sum=torch.tensor(3.0),
                                      per_sample_loss=torch.tensor([0.1]), timesteps=torch.tensor([0.5])),
                           StepResult(torch.tensor([False]), 20, loss_sum=torch.tensor(float("nan")))],
                          [batch((4, 8, 8)), batch((4, 8, 8))], data_time=0.1, trained=False)
    local = StepTotals.local(outcome)
    assert (local.loss_sum, local.tokens, local.flops) == (0, 0, 0)
    row = step_metrics(outcome, local, **CONTEXT)
    assert row["loss"] is None and row["mfu"] is None
    assert not [k for k in row if k.startswith("loss_t") or k.startswith("loss_bucket/")]
