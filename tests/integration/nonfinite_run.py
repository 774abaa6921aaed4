"""Test-only entry (under torchrun): a real training run whose model output is made non-finite on chosen
micro-batches, then the trained weights written to a file. The fault is injected here, with a forward hook,
not by a switch in Kino's code.

    python -m torch.distributed.run ... -m tests.integration.nonfinite_run OUT POISONED key=value ...

POISONED: comma-separated 0-based indices of the training forward passes (micro-batches) to poison.
"""
import sys

import torch


def main() -> None:
    out, poisoned, overrides = sys.argv[1], {int(i) for i in sys.argv[2].split(",") if i}, sys.argv[3:]
    from conf.schema import load_config
    from train.engine import full_parameters, init_distributed
    from train.trainer import Trainer

    cfg = load_config(overrides)
    env = init_distributed()
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
        torch.save(weights, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
