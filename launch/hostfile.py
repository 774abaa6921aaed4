"""`python -m launch deepspeed`: DeepSpeed's own launcher over SSH, for clusters with a hostfile and no scheduler.

    python -m launch deepspeed launcher.hostfile=/job/hostfile experiment=...   # "host slots=N" lines

DeepSpeed's runner reaches every host over SSH (pdsh) and starts the same `-m train` entry there. It
starts no Ray: with several hosts, start a Ray cluster yourself (`ray start --head` on the first host,
`ray start --address=HEAD:6379` on the others) and pass data.ray_address=HEAD:6379.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from launch.local import run_in_foreground
from data.ray_head import tool_beside_python
from launch.plan import LaunchError, LaunchPlan


def read_hostfile(path: str) -> Dict[str, int]:
    """host -> slots, in file order (DeepSpeed's format: `worker-1 slots=8`, # comments)."""
    hosts: Dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise LaunchError(f"launcher.hostfile: cannot read {path} ({error.strerror})") from error
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise LaunchError(f"{path}:{number}: expected `HOST slots=N`, got {line!r}")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise LaunchError(f"{path}: no hosts")
    return hosts


def command(plan: LaunchPlan) -> List[str]:
    launcher = plan.cfg.launcher
    words = [tool_beside_python("deepspeed"), f"--master_port={launcher.rdzv_port}"]
    if launcher.hostfile:
        hosts = read_hostfile(launcher.hostfile)
        if len(hosts) > 1 and not plan.cfg.data.ray_address:
            raise LaunchError(f"{len(hosts)} hosts in {launcher.hostfile} and no data.ray_address: the data "
                              "coordinator needs a Ray cluster spanning them (see `python -m launch --help`)")
        words += [f"--hostfile={launcher.hostfile}", f"--master_addr={next(iter(hosts))}"]  # every host listed
        if launcher.procs_per_node is not None:
            words.append(f"--num_gpus={plan.procs_per_node}")
    else:
        words += ["--num_nodes=1", f"--num_gpus={plan.procs_per_node}"]
    # --no_local_rank: ranks read LOCAL_RANK from the environment, as under torchrun
    return words + ["--no_local_rank", "--module", "train", *plan.overrides]


def run(plan: LaunchPlan, dry_run: bool) -> int:
    return run_in_foreground(command(plan), plan, dry_run)
