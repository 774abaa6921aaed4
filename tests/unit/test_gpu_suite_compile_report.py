"""benchmarks/gpu_suite.py: each case starts Dynamo afresh and a compiled case reports its graph breaks or eager
fallback by name, so a GPU report cannot pass off an eager or broken run as compiled (Dynamo's eager backend: the
counting is Dynamo's, whichever backend compiles)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_suite import compile_problems, guarded  # noqa: E402


def _case(breaks: bool):
    def body(x):
        y = x * 2
        if breaks:
            print("", end="")  # a graph break: Dynamo cannot trace print
        return y + 1

    compiled = torch.compile(body, backend="eager")
    compiled(torch.ones(4))
    return {"model": "broken" if breaks else "clean", "tokens": 4, "attention": "sdpa", "compiled": True}


def test_a_case_with_a_graph_break_is_named_and_the_next_case_starts_clean():
    broken = guarded(_case, True)
    clean = guarded(_case, False)  # had counters not been reset, it would inherit the first case's break
    assert broken["graph_breaks"] >= 1 and broken["compile_note"] and not broken["eager"]
    assert clean["graph_breaks"] == 0 and clean["graphs"] >= 1 and clean["compile_note"] == ""
    problems = compile_problems({"versus_wan": [broken, clean], "backends": []})
    assert len(problems) == 1 and problems[0].startswith("broken 4 tokens")


def test_an_eager_case_is_not_given_a_compile_report():
    row = guarded(lambda: {"model": "eager", "tokens": 4, "attention": "sdpa", "compiled": False})
    assert "graph_breaks" not in row
