"""The GPU machine's one command, rehearsed on the CPU where no GPU is lent: `benchmarks/gpu_check.py
--rehearse` runs tests/gpu (the trainer end to end, fp32 and bf16, stop/resume/samples) and the model-step
benchmark, and prints its table. Ray and W&B are made unimportable, as on the GPU machine (they do not fit
in the wheel kit of ../shared/gpu): a one-process run must not need them."""
import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_check_runs_end_to_end_without_ray_or_wandb(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ("ray", "wandb"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = dict(os.environ, PYTHONPATH=str(blocked), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--rehearse", "--out", str(tmp_path / "out")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| tests/gpu | " in table and " 0 failed" in table
    for precision in ("fp32", "bf16"):
        assert f"experiment=demo, {precision}, 1 process | 6 steps (resumed at 3)" in table  # 20 at 10 on a GPU
    assert "| model_step tiny" in table and "Kino / Wan" in table


def test_the_step_profile_groups_device_time_and_lists_the_top_operators():
    """benchmarks/profile_step.py is the other command the GPU machine runs; on the CPU it profiles CPU time."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--model", "tiny", "--tokens", "512",
                             "--dtype", "fp32", "--steps", "1", "--top", "5"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shares = [float(line.split("|")[2].strip().rstrip("%")) for line in result.stdout.splitlines()
              if line.startswith("| ") and line.rstrip().endswith("% |") and line.count("|") == 3]
    assert shares and abs(sum(shares) - 100) < 1  # every operator lands in exactly one group
    assert "| matmul |" in result.stdout and "| attention |" in result.stdout
    assert result.stdout.count("| `") == 5  # --top rows
