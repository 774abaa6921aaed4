"""Test-only entry (under torchrun): real training runs whose model output is made non-finite on chosen
micro-batches, each run's trained weights then written to a file. The fault is injected here, with a forward hook,
not by a switch in Kino's code.

    python -m torch.distributed.run ... -m tests.integration.nonfinite_run OUT_DIR PATTERNS key=value ...

PATTERNS: runs separated by ';', each a comma-separated list of the 0-based indices of the training forward passes
(micro-batches) to poison ('' poisons none). The runs go one after another in the same process group (one launch:
start-up costs more than the steps), each with its own run directory OUT_DIR/run-LABEL, weights OUT_DIR/LABEL.pt,
where LABEL is the pattern with '-' for ',' ('clean' for none). Every Trainer seeds its own model and data.
"""
import sys
from pathlib import Path

import torch


def label(pattern: str) -> str:
    return pattern.replace(",", "-") or "clean"


def train_poisoned(overrides, out_dir: Path, pattern: str, env) -> None:
    from conf.schema import load_config
    from train.engine import full_parameters
    from train.trainer import Trainer

    poisoned = {int(i) for i in pattern.split(",") if i}
    overrides = [o for o in overrides if not o.startswith("train.run_dir=")]
    cfg = load_config([*overrides, f"train.run_dir={out_dir / f'run-{label(pattern)}'}"])
    trainer = Trainer(cfg, env)
    calls = [0]

    def poison(module, inputs, output):
        if not module.training:
            return output
        index, calls[0] = calls[0], calls[0] + 1
        return output * float("nan") if index in poisoned else output

    trainer.model.register_forward_hook(poison)
    trainer.train()
    with full_parameters(trainer.model):
        weights = {name: p.detach().cpu().clone() for name, p in trainer.model.named_parameters()}
    if env.is_main:
        torch.save(weights, out_dir / f"{label(pattern)}.pt")
    torch.distributed.barrier()


def main() -> None:
    out_dir, patterns, overrides = Path(sys.argv[1]), sys.argv[2].split(";"), sys.argv[3:]
    from train.engine import init_distributed

    env = init_distributed()
    for pattern in patterns:
        train_poisoned(overrides, out_dir, pattern, env)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
