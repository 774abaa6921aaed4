"""`python -m train.export RUN [--ema | --raw] [--step N] [--out DIR]`: consolidated weights of a run.

Writes DIR/model.safetensors (fp32, one file whatever the ZeRO stage) and DIR/config.yaml.
--ema (default) exports the EMA weights; --raw the trained weights, consolidated from the
DeepSpeed shards. DIR defaults to RUN/export/step_N.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Dict

import torch

from train.checkpoint import ENGINE_TAG, latest_checkpoint


def checkpoint_path(run_dir: Path, step: int = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    path = root / f"step_{step}" if step is not None else latest_checkpoint(root)
    if path is None or not (path / "COMPLETE").exists():
        raise SystemExit(f"no complete checkpoint {'step_' + str(step) if step is not None else ''} in {root}")
    return path


def ema_weights(checkpoint: Path) -> Dict[str, torch.Tensor]:
    return torch.load(checkpoint / "ema.pt", map_location="cpu")["weights"]


def raw_weights(checkpoint: Path) -> Dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)


def export(run_dir, use_ema: bool = True, step: int = None, out: Path = None) -> Path:
    from safetensors.torch import save_file

    checkpoint = checkpoint_path(Path(run_dir), step)
    weights = ema_weights(checkpoint) if use_ema else raw_weights(checkpoint)
    out = Path(out or Path(run_dir) / "export" / checkpoint.name)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"source": str(checkpoint), "weights": "ema" if use_ema else "raw"})
    shutil.copyfile(checkpoint / "config.yaml", out / "config.yaml")
    return out


def load_exported(directory) -> tuple:
    """(config, model with the exported weights) for the run's method."""
    from safetensors.torch import load_file

    from conf.schema import from_yaml
    from train.methods import build_model

    directory = Path(directory)
    cfg = from_yaml((directory / "config.yaml").read_text())
    model = build_model(cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return cfg, model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ema", action="store_true", default=True, help="export EMA weights (default)")
    which.add_argument("--raw", action="store_true", help="export the trained (non-EMA) weights")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = export(args.run_dir, use_ema=not args.raw, step=args.step, out=args.out)
    print(f"exported {'raw' if args.raw else 'EMA'} weights to {out / 'model.safetensors'} (+ config.yaml)")


if __name__ == "__main__":
    main()
