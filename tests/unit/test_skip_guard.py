"""`make test` runs pytest with tests/skip_guard.py: a skipped test that is not CUDA-only fails the run, by name."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO


def run_pytest(root, files, *options):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.skip_guard", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(root), "-c", os.devnull, *options, str(root)], cwd=root, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_skipped_slurm_test_fails_the_run_and_is_named(tmp_path, workers):
    """Also under pytest-xdist, as `make test` runs: the workers' skips reach the controller's count."""
    result = run_pytest(tmp_path, {"integration/test_cluster.py": """
        import pytest

        def test_runs():
            assert True

        def test_two_slurm_nodes():
            pytest.skip("slurm-wlm and munge are not installed and apt-get cannot run here (needs root)")
        """}, *workers)
    assert result.returncode == 1, result.stdout
    assert "SKIPPED (not allowed) integration/test_cluster.py::test_two_slurm_nodes: slurm-wlm and munge" in result.stdout
    assert "1 unexpected skip(s): the run fails" in result.stdout


def test_cuda_only_skips_pass_and_are_counted(tmp_path):
    result = run_pytest(tmp_path, {"tests/gpu/test_kernels.py": """
        import pytest

        pytestmark = pytest.mark.skipif(True, reason="no CUDA device on this machine")

        def test_kernel():
            pass
        """, "unit/test_marked.py": """
        import pytest

        @pytest.mark.cuda_only
        def test_marked():
            pytest.skip("needs a CUDA device")

        def test_plain():
            pass
        """})
    assert result.returncode == 0, result.stdout
    assert "skip guard: 2 CUDA-only skip(s), no other test skipped" in result.stdout


def test_a_cuda_reason_outside_the_cuda_only_tests_still_fails(tmp_path):
    result = run_pytest(tmp_path, {"unit/test_ray.py": """
        import pytest

        def test_ray():
            pytest.importorskip("ray_that_is_not_installed", reason="needs CUDA")
        """})
    assert result.returncode == 1 and "SKIPPED (not allowed) unit/test_ray.py::test_ray" in result.stdout
