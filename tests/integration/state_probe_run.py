"""Test-only entry (under torchrun): `python -m train`, which also writes the engine's full fp32 weights and Adam
moments, gathered over the ranks as DeepSpeed assembles them (safe_get_full_fp32_param / _optimizer_state):

    OUT.resumed.pt  right after a resume restored the checkpoint (before any step)
    OUT.final.pt    after the run's last step and final checkpoint (before the end of the run frees the moments)

A test compares a run's final state with the next run's resumed one: a resume onto another world size goes through
DeepSpeed's universal format, and what it loads must be what was saved. Nothing of this is a switch in Kino.

    python -m torch.distributed.run ... -m tests.integration.state_probe_run OUT key=value ...
"""
import sys

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def engine_state(trainer):
    """Collective: {"step", "weights", "exp_avg", "exp_avg_sq", "ema"}, each {name: fp32 tensor} (rank 0; None
    elsewhere); "ema" is the EMA consolidated from the ranks' pieces, with its update count in "ema_updates"."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from train.ema import consolidated

    state = {"step": trainer.step, "weights": {}, **{key: {} for key in MOMENTS}, "ema_updates": trainer.ema.updates,
             "ema": {name: value for name, value in consolidated(trainer.engine.module, trainer.ema, trainer.env.device)
                     if value is not None}}
    link = getattr(trainer.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 link their Adam moments to the parameters at the first step (or a universal load)
        link()
    for name, param in trainer.engine.module.named_parameters():
        if not param.requires_grad:
            continue
        weight = safe_get_full_fp32_param(param)
        assert weight is not None, f"{name}: DeepSpeed keeps no fp32 copy of it"
        state["weights"][name] = weight.detach().float().cpu().clone()
        for key in MOMENTS:
            state[key][name] = safe_get_full_optimizer_state(param, key).detach().float().cpu().clone()
    return state if trainer.env.is_main else None


def main() -> int:
    out, overrides = sys.argv[1], sys.argv[2:]
    from train.main import main as train_main
    from train.trainer import Trainer

    prepare, release, summary = Trainer.prepare_run_dir, Trainer.release_optimizer_state, Trainer.summary
    final = {}

    def probed_prepare(self, resumed):
        if resumed:
            state = engine_state(self)
            if state is not None:
                torch.save(state, f"{out}.resumed.pt")
        return prepare(self, resumed)

    def probed_release(self):  # the end of a run frees the moments: read them first
        final["state"] = engine_state(self)
        return release(self)

    def probed_summary(self, videos):
        state = final["state"] if "state" in final else engine_state(self)
        if state is not None:
            torch.save(state, f"{out}.final.pt")
        return summary(self, videos)

    Trainer.prepare_run_dir, Trainer.release_optimizer_state = probed_prepare, probed_release
    Trainer.summary = probed_summary
    return train_main(overrides)


if __name__ == "__main__":
    sys.exit(main())
