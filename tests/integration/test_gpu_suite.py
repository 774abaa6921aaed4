"""benchmarks/gpu_suite.py, the one command for issue 12's GPU figures, rehearsed on the CPU at toy sizes: every
part runs end to end (Kino and diffusers Wan steps, each attention backend, three real trainer runs and the memory
estimate) and the report has every table. Its numbers mean nothing here; on a GPU the same command measures."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_suite_rehearses_every_part_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--rehearse", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    models = [(row["model"], row["tokens"]) for row in report["versus_wan"]]
    assert {m for m, _ in models} == {"Kino (per_block)", "Kino (shared)", "diffusers Wan"} and len(models) == 6
    assert all(row["tokens_per_s"] > 0 for row in report["versus_wan"])
    per_block, shared = (next(r["params"] for r in report["versus_wan"] if r["model"] == name)
                         for name in ("Kino (per_block)", "Kino (shared)"))
    assert shared < per_block  # the shared modulation table drops each block's projection
    assert {row["attention"] for row in report["backends"]} == {"sdpa"}
    assert [row["steps"] for row in report["trainer"]] == [3, 3, 3]
    assert all(0 <= row["data_wait_frac"] <= 1 and row["estimate_gb"] > 0 for row in report["trainer"])
    table = (tmp_path / "gpu_suite.md").read_text()
    for part in ("(a) Kino vs diffusers Wan", "(b) attention backends", "(c) the trainer's step",
                 "(e) the longest clip", "(f) Kino's Wan vs diffusers' Wan"):
        assert part in table
    # (e): sizes doubled until the time budget, with and without tiling, each next to the estimator's answer
    assert [row["tiling"] for row in report["longest_clip"]] == [False, True]
    for row in report["longest_clip"]:
        tokens = [t["tokens"] for t in row["tried"]]
        assert len(tokens) >= 2 and tokens == sorted(tokens) and row["longest_trained"] == tokens[-1]
        assert row["stopped_by"] == "time budget" and row["estimate_longest"] > 0
    (wan,) = report["wan_identical"]  # (f): identical weights, identical outputs
    assert wan["max_abs_output_difference"] < 1e-5 < wan["max_abs_output"] and wan["kino_tokens_per_s"] > 0
    tiled, plain = (next(r["estimate_longest"] for r in report["longest_clip"] if r["tiling"] == t) for t in (1, 0))
    assert tiled > plain  # tiling leaves room for more tokens


def test_the_gpu_suite_runs_a_subset_of_its_parts_for_calls_of_limited_length(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--rehearse", "--parts", "e", "--out",
                             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite_e.json").read_text())
    assert report["versus_wan"] == report["backends"] == report["trainer"] == []
    assert len(report["longest_clip"]) == 2
