"""`python -m launch local|slurm|k8s|deepspeed [--dry-run] [--apply] [key=value ...]`

Every path composes and validates the same Hydra config (the same overrides as `python -m train`),
checks the per-GPU memory estimate when GPUs are requested, and starts the same entry, `-m train`,
under torchrun; a run can move between them and resume its run directory.

  local      torchrun --standalone on this machine (launcher.procs_per_node processes)
  slurm      render an sbatch script (launcher.nodes, launcher.slurm.*), submit it, print job id and logs
  k8s        render a JobSet (launcher.k8s.api=jobset) or PyTorchJob manifest into RUN/k8s/; --apply runs kubectl
  deepspeed  DeepSpeed's SSH launcher over launcher.hostfile

--dry-run prints the command, script or manifests and starts nothing. A bad config exits with 2
before anything starts.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from conf.errors import UserError
from launch.plan import make_plan

SCHEDULERS = ("local", "slurm", "k8s", "deepspeed")


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in SCHEDULERS:
        print(__doc__, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    scheduler, rest = args[0], args[1:]
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        return 0
    flags = {a for a in rest if a.startswith("--")}
    unknown = flags - {"--dry-run", "--apply"}
    if unknown:
        print(f"kino launch: unknown option(s) {sorted(unknown)}; options: --dry-run, --apply", file=sys.stderr)
        return 2
    overrides = [a for a in rest if not a.startswith("--")]
    dry_run = "--dry-run" in flags
    try:
        plan = make_plan(scheduler, overrides, dry_run)
        # The summary goes to stderr under --dry-run, so stdout is exactly the script or manifests.
        print(plan.describe(), file=sys.stderr if dry_run else sys.stdout, flush=True)
        if scheduler == "local":
            from launch import local
            return local.run(plan, dry_run)
        if scheduler == "slurm":
            from launch import slurm
            return slurm.run(plan, dry_run)
        if scheduler == "k8s":
            from launch import k8s
            return k8s.run(plan, dry_run, apply="--apply" in flags)
        from launch import hostfile
        return hostfile.run(plan, dry_run)
    except UserError as error:  # a LaunchError, or a mistake found reading the run's files
        print(f"kino launch: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
