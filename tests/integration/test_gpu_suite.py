"""benchmarks/gpu_suite.py, the one command for issue 12's GPU figures, rehearsed on the CPU at toy sizes in the two
calls `make gpu-suite` makes on a GPU: every part runs end to end (Kino and diffusers Wan steps, each attention backend, three real trainer runs and the memory
estimate) and the report has every table. Its numbers mean nothing here; on a GPU the same command measures."""
import json
import subprocess
import sys

from tests.conftest import REPO


def rehearse(out, parts: str):
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--rehearse", "--parts", parts, "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / f"gpu_suite_{parts}.json").read_text()), (out / f"gpu_suite_{parts}.md").read_text()


def test_the_gpu_suite_rehearses_every_part_on_the_cpu_in_the_two_calls_a_gpu_session_makes(tmp_path):
    """`make gpu-suite` on the GPU machine runs PARTS=abcd, then PARTS=ef (a call lasts 10 minutes at most): each
    call's report holds its own parts' tables and leaves the others empty."""
    first, first_table = rehearse(tmp_path, "abcd")
    second, second_table = rehearse(tmp_path, "ef")
    assert first["longest_clip"] == first["wan_identical"] == []
    assert second["versus_wan"] == second["backends"] == second["trainer"] == []
    models = [(row["model"], row["tokens"]) for row in first["versus_wan"]]
    assert {m for m, _ in models} == {"Kino (per_block)", "Kino (shared)", "diffusers Wan"} and len(models) == 6
    assert all(row["tokens_per_s"] > 0 for row in first["versus_wan"])
    per_block, shared = (next(r["params"] for r in first["versus_wan"] if r["model"] == name)
                         for name in ("Kino (per_block)", "Kino (shared)"))
    assert shared < per_block  # the shared modulation table drops each block's projection
    assert {row["attention"] for row in first["backends"]} == {"sdpa"}
    assert [row["steps"] for row in first["trainer"]] == [3, 3, 3]
    assert all(0 <= row["data_wait_frac"] <= 1 and row["estimate_gb"] > 0 for row in first["trainer"])
    for part in ("(a) Kino vs diffusers Wan", "(b) attention backends", "(c) the trainer's step"):
        assert part in first_table
    for part in ("(e) the longest clip", "(f) Kino's Wan vs diffusers' Wan"):
        assert part in second_table
    # (e): sizes doubled until the time budget, with and without tiling, each next to the estimator's answer
    assert [row["tiling"] for row in second["longest_clip"]] == [False, True]
    for row in second["longest_clip"]:
        tokens = [t["tokens"] for t in row["tried"]]
        assert len(tokens) >= 2 and tokens == sorted(tokens) and row["longest_trained"] == tokens[-1]
        assert row["stopped_by"] == "time budget" and row["estimate_longest"] > 0
    (wan,) = second["wan_identical"]  # (f): identical weights, identical outputs
    assert wan["max_abs_output_difference"] < 1e-5 < wan["max_abs_output"] and wan["kino_tokens_per_s"] > 0
    tiled, plain = (next(r["estimate_longest"] for r in second["longest_clip"] if r["tiling"] == t) for t in (1, 0))
    assert tiled > plain  # tiling leaves room for more tokens
