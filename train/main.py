"""Hydra entry point: `python -m train [--dry-run] key=value ...` (under torchrun for several processes).

The config is composed and validated before any process group starts; a bad
config exits with status 2 and the offending key in the message, as does a stage whose every sample is dropped
or a resume onto changed shards or with a changed config. Other statuses: 3 after
too many non-finite losses; 75 when stopped by a signal (with a checkpoint: run again to
resume); 0 when finished or stopped by the scheduler's stop file (train/preemption.py).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

from conf.schema import ConfigError, load_config, to_yaml
from train.preflight import check_data


def _setup_logging(rank: int) -> None:
    # Libraries stay at WARNING (DeepSpeed's op probes are chatty at INFO); Kino's own progress is INFO on rank 0.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for ours in ("kino", "data", "train", "models"):
        logging.getLogger(ours).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def usage() -> str:
    from conf.keys import config_groups, group_options

    groups = "\n".join(f"  {group:<11} {', '.join(group_options(group))}" for group in config_groups())
    return f"""usage: python -m train [--dry-run] [GROUP=OPTION ...] [KEY=VALUE ...]
       torchrun --nproc_per_node=N -m train ...   (python -m launch local|slurm|k8s starts it for you)

Trains the run the composed config describes (conf/config.yaml, then the groups, then KEY=VALUE overrides),
resuming from RUN/checkpoints/latest. --dry-run validates the config, prints it and exits.

config groups (GROUP=OPTION picks conf/GROUP/OPTION.yaml):
{groups}

every key, its type, default and meaning: docs/configuration.md; the resolved config: python -m train --dry-run ...
exit status: 0 done, 2 a mistake in the config or data (one line says which), 3 non-finite losses, 75 stopped by a
signal with a checkpoint (run again to resume)."""


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(usage())
        return 0
    dry_run = "--dry-run" in args
    overrides = [a for a in args if a != "--dry-run"]
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    try:
        # torchrun's world, or a plain `python -m train`'s world of one
        cfg = load_config(overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        print(f"kino: {error}", file=sys.stderr)
        return 2
    if not dry_run:
        from train.tracking import wandb_credentials_problem

        try:
            from train.checkpoint import resume_refusal

            problem = wandb_credentials_problem(cfg.tracking)
            if problem:
                raise ConfigError(problem)
            check_data(cfg)  # the datasets, caches and base weights it names, here where the run starts
            problem = resume_refusal(cfg)
            if problem:
                raise ConfigError(problem)
        except ConfigError as error:
            if rank == 0:
                print(f"kino: {error}", file=sys.stderr)
            return 2
    if dry_run:
        print(to_yaml(cfg))
        print(f"config OK: {cfg.total_steps} steps in {len(cfg.curriculum.stages)} stage(s), run dir {cfg.run_dir}")
        return 0

    from models.attention import BackendUnavailable
    from train.engine import cpu_threads, init_distributed
    from train.methods import method
    from train.checkpoint import ResumeRefused
    from train.data_plane import NothingToTrain
    from train.trainer import NonFiniteLoss

    env = init_distributed()
    threads = cpu_threads(cfg, env)
    if threads is not None and env.is_main:
        logging.getLogger("kino").info("CPU: %d intra-op thread(s) per process (train.cpu_threads)", threads)
    trainer_class = method(cfg.train.method).trainer()
    try:
        summary = trainer_class(cfg, env).train()
    except BackendUnavailable as error:  # this machine cannot run the forced kernel: a config error here
        if env.is_main:
            print(f"kino: model.attention_backend: {error}", file=sys.stderr)
        return 2
    except ResumeRefused as error:  # a changed config or dataset: every rank finds it, rank 0 says it
        if env.is_main:
            print(f"kino: {error}", file=sys.stderr)
        return 2
    except NothingToTrain as error:  # raised by the rank that read the data
        print(f"kino: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        if env.is_main:
            print(f"kino: training stopped: {error}", file=sys.stderr)
        return 3
    if env.is_main:
        _print_summary(summary)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # 75 after a stop by signal (train/preemption.py): the scheduler must restart the run, which resumes.
    return summary.get("exit_status", 0)


def _print_summary(summary: dict) -> None:
    audit = summary["audit"]
    print("\n==== kino run finished ====")
    print(f"run directory : {summary['run_dir']}  (config.yaml, metrics.jsonl, provenance/)")
    if summary.get("preempted"):
        print(f"stopped       : at step {summary['step']} of {summary['total_steps']} on request; "
              f"the next run resumes from the checkpoint (exit status {summary['exit_status']})")
    print(f"checkpoint    : {summary['checkpoint']}")
    if summary.get("data_plan"):
        print(f"data plan     : {summary['data_plan']}")
    print(f"videos        : {', '.join(summary['videos']) or '-'}")
    print(f"W&B files     : {summary['wandb_dir'] or 'tracking disabled'}")
    print(f"trained on    : {json.dumps(audit['license_totals'], sort_keys=True)} samples per license")
    base = summary.get("base_model")
    if base:
        print(f"base model    : {base['name']} ({base['license']}, sha256 {base['sha256']}) from {base['path']}")
    dropped = ", ".join(f"{reason}={count} (e.g. {', '.join(audit['dropped_examples'].get(reason, [])[:3])})"
                        for reason, count in sorted(audit["dropped"].items()))
    print(f"dropped       : {dropped or 'none'}")
    if summary.get("evaluation"):
        from train.evaluate import table

        print("evaluation    : EMA weights at the last step (train/evaluate.py; adherence judged from pixels)")
        print("\n".join("  " + line for line in table(summary["evaluation"]).splitlines()))


if __name__ == "__main__":
    sys.exit(main())
