"""`python -m launch local`: torchrun on this machine, the same `-m train` entry as on a cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import List

from launch.processes import as_stop_signal, exit_status, shutdown_timeout_args
from launch.plan import LaunchError, LaunchPlan, shell_join


STOP_GRACE_S = 600  # after SIGTERM, torchrun waits this long for the ranks' checkpoint before killing them


def command(plan: LaunchPlan) -> List[str]:
    return [sys.executable, "-m", "launch.torchrun", "--standalone",
            f"--nproc-per-node={plan.procs_per_node}", *shutdown_timeout_args(STOP_GRACE_S), *plan.train_command()]


def run(plan: LaunchPlan, dry_run: bool) -> int:
    if not dry_run:  # the paths are this machine's: the data they name is checked before torchrun starts
        from conf.schema import ConfigError
        from train.preflight import check_data

        from train.checkpoint import resume_refusal

        try:
            check_data(plan.cfg)
        except ConfigError as error:
            raise LaunchError(str(error)) from error
        refusal = resume_refusal(plan.cfg)  # the run directory is this machine's too
        if refusal:
            raise LaunchError(refusal)
    return run_in_foreground(command(plan), plan, dry_run)


def run_in_foreground(words: List[str], plan: LaunchPlan, dry_run: bool) -> int:
    """Print the command; unless dry_run, run it, passing stop signals on, and return its status."""
    if dry_run:
        print(shell_join(words))
        return 0
    print(f"$ {shell_join(words)}", flush=True)
    env = dict(os.environ, **plan.cfg.launcher.env)
    trainer = subprocess.Popen(words, env=env)

    def pass_on(signum, frame) -> None:
        if trainer.poll() is None:
            trainer.send_signal(as_stop_signal(signum))

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, pass_on)
    return exit_status(trainer.wait())
