"""A pytest plugin (`-p tests.skip_guard`, which `make test` passes): the run fails when a test skips that is not
CUDA-only, naming each one. A skipped SLURM, Ray, diffusers or CRD test is a check that did not run; a green
suite must not hide it.

A skip is expected only for a test in tests/gpu/ or marked `cuda_only`, and only with a reason that says CUDA is
missing. `-p no:tests.skip_guard` (or plain `pytest`) lets skips pass, for a developer's partial runs.
"""
from __future__ import annotations

from typing import List, Tuple

import pytest

CUDA_WORDS = ("cuda", "gpu")


def _expected(nodeid: str, keywords, reason: str) -> bool:
    cuda_only = "/tests/gpu/" in "/" + nodeid.replace("\\", "/") or "cuda_only" in keywords
    return cuda_only and any(word in reason.lower() for word in CUDA_WORDS)


class SkipGuard:
    """Counts skips from test reports, where the run is summed up: in the one pytest process, or in pytest-xdist's
    controller (`make test` runs two workers), which receives every worker's reports."""

    def __init__(self) -> None:
        self.unexpected: List[Tuple[str, str]] = []
        self.expected = 0

    def pytest_runtest_logreport(self, report):
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if _expected(report.nodeid, report.keywords, reason):
            self.expected += 1
        else:
            self.unexpected.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_sessionfinish(self, session):
        if self.unexpected and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if not self.unexpected:
            terminalreporter.write_line(f"skip guard: {self.expected} CUDA-only skip(s), no other test skipped")
            return
        terminalreporter.section("skip guard: tests that skipped and are not CUDA-only", red=True)
        for nodeid, reason in self.unexpected:
            terminalreporter.write_line(f"SKIPPED (not allowed) {nodeid}: {reason}", red=True)
        terminalreporter.write_line(f"{len(self.unexpected)} unexpected skip(s): the run fails", red=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: a test that can run only with a CUDA device (its skip is expected "
                                       "where none is)")
    if not hasattr(config, "workerinput"):  # an xdist worker sends its reports to the controller, which counts
        config.pluginmanager.register(SkipGuard(), "kino-skip-guard")
