"""The trainer end to end on one CUDA device, as a user first runs it: `python -m train experiment=demo` in
fp32 and in bf16, 20 steps each, stopped at step 10 and resumed (6 stopped at 3 in the CPU rehearsal), samples
written at the end.

The GPU machine has no Ray and no W&B: a one-process run uses the in-process data coordinator and
`tracking.mode=disabled`. When KINO_GPU_REPORT_DIR is set (benchmarks/gpu_check.py sets it), each run's
throughput figures are written there as JSON for the check's table. Skipped without CUDA, unless
KINO_GPU_CHECK_REHEARSAL=1 (benchmarks/gpu_check.py --rehearse) runs the same steps on the CPU, so the
check itself is exercised where no GPU is lent.
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, free_port

REHEARSAL = os.environ.get("KINO_GPU_CHECK_REHEARSAL") == "1"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or REHEARSAL),
                                reason="no CUDA device on this machine")
# On a GPU, 20 steps stopped at 10; the CPU rehearsal proves the same path (stop, resume, samples) in 6 stopped at 3.
STEPS, STOP_AT = (20, 10) if torch.cuda.is_available() else (6, 3)


def train(run_dir: Path, dataset: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train", "experiment=demo", f"data.root={dataset}", f"train.run_dir={run_dir}",
               "tracking.mode=disabled", "tracking.log_every=1", "tracking.sampling_steps=8",
               f"curriculum.stages.0.steps={STEPS * 3 // 5}", f"curriculum.stages.1.steps={STEPS - STEPS * 3 // 5}",
               "train.checkpoint_every=100",
               "tracking.eval_prompts=2", "tracking.eval_clips=0",  # the evaluation path, on the device
               *overrides]
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_demo_trains_stops_resumes_and_samples_on_one_gpu(precision, tiny_dataset, tmp_path):
    run_dir = tmp_path / precision
    first = train(run_dir, tiny_dataset, f"zero.precision={precision}", f"train.stop_after_steps={STOP_AT}")
    assert f"stopping at step {STOP_AT}" in first.stdout
    second = train(run_dir, tiny_dataset, f"zero.precision={precision}")
    assert "resuming from" in second.stdout and f"step_{STOP_AT}" in second.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step trained and logged once
    assert all(r["loss"] is not None and 0 < r["loss"] < 10 for r in rows)
    assert (run_dir / "checkpoints" / f"step_{STEPS}" / "COMPLETE").exists()
    from tests.exactly_once import assert_exactly_once

    assert_exactly_once(run_dir)
    samples = sorted((run_dir / "videos" / f"step_{STEPS}").glob("*.mp4"))
    assert samples and all(p.stat().st_size > 0 for p in samples)
    if os.environ.get("KINO_GPU_REPORT_DIR"):
        steady = [r for r in rows if r["step"] not in (1, STOP_AT + 1)]  # first steps of a process warm up
        report = {
            "precision": precision, "steps": len(rows), "resumed_at": STOP_AT, "samples": len(samples),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "data_wait_frac": statistics.mean(r["data_wait_frac"] for r in steady),
            "step_time_s": statistics.median(r["step_time_s"] for r in steady),
            "peak_memory_gb": max((r.get("peak_memory_gb") or 0.0) for r in rows),
            "final_loss": rows[-1]["loss"],
        }
        out = Path(os.environ["KINO_GPU_REPORT_DIR"]) / f"trainer_{precision}.json"
        out.write_text(json.dumps(report, indent=1))
