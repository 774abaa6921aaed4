"""tests/forked_ranks.py stands in for torchrun in most training tests: its ranks must see what torchrun's see,
rendezvous the same way, and fail the way torchrun's do."""
import subprocess
import sys
import textwrap
import time

from tests.conftest import REPO
from tests.forked_ranks import parse, run_ranks

RANK_SCRIPT = """
    import os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR")
    line = " ".join(map(str, ("rank", dist.get_rank(), "of", dist.get_world_size(), "sum", int(total), "args",
                              sys.argv[1:], "env", [os.environ[k] != "" for k in keys], "cwd",
                              os.getcwd() == os.environ["EXPECTED_CWD"])))
    sys.stdout.write(line + "\\n")  # one write: unbuffered ranks sharing torchrun's pipe cannot interleave it
    sys.stdout.flush()
    dist.destroy_process_group()
    """


def torchrun_command(script, nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
            *args]


def test_forked_ranks_rendezvous_and_see_what_torchruns_ranks_see(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {"EXPECTED_CWD": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    command = torchrun_command(script, 3, "a", "b=1")
    forked = run_ranks(command, cwd=tmp_path, env=env, timeout=120)
    real = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert forked.returncode == real.returncode == 0, forked.stderr + real.stderr
    lines = sorted(line for line in forked.stdout.splitlines() if line.startswith("rank"))
    assert lines == sorted(line for line in real.stdout.splitlines() if line.startswith("rank"))
    assert len(lines) == 3 and all("sum 6 args ['a', 'b=1'] env [True, True, True, True, True, True, True] cwd True"
                                   in line for line in lines)


def test_a_failed_rank_stops_the_others_and_fails_the_run_as_torchrun_does(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(120)\n")
    started = time.monotonic()
    result = run_ranks(torchrun_command(script, 2), cwd=tmp_path, timeout=120)
    assert result.returncode == 1  # torchrun's status when a rank fails
    assert "rank 1 exited with 3: stopping the others" in result.stderr
    assert time.monotonic() - started < 60  # rank 0 did not sleep out its 120 s


def test_a_plain_python_m_command_keeps_its_own_status_and_other_commands_run_as_given(tmp_path):
    result = run_ranks([sys.executable, "-m", "train", "experiment=demo", "zero.stage=7"], cwd=REPO, timeout=120)
    assert result.returncode == 2 and "zero.stage=7" in result.stderr
    assert parse([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "-m", "train"]) is None  # multi-node
    assert parse(["sbatch", "job.sh"]) is None
    assert run_ranks([sys.executable, "-c", "print('as given')"], cwd=tmp_path).stdout == "as given\n"
