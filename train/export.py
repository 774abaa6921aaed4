"""`python -m train.export RUN [--ema | --raw] [--step N] [--out DIR] [--format kino|diffusers] [--lora merged|adapters]`.

Consolidated weights of a run, fp32, one file whatever the ZeRO stage. --ema (default) exports the EMA weights;
--raw the trained weights, consolidated from the DeepSpeed shards. DIR defaults to RUN/export/step_N.

  --format kino (default)  DIR/model.safetensors and DIR/config.yaml: what Kino reads back (`load_exported`).
  --format diffusers       (model.arch=wan) a directory `WanTransformer3DModel.from_pretrained(DIR)` loads. A LoRA
                           run writes the base weights with the adapters merged in (--lora merged, default), or
                           DIR/pytorch_lora_weights.safetensors alone, in diffusers' LoRA format (--lora adapters:
                           `transformer.load_lora_adapter(DIR, prefix="transformer")` on the base model).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import torch

from conf.errors import ArgumentParser, UserError, at_least
from train.checkpoint import ENGINE_TAG, latest_checkpoint


def checkpoint_path(run_dir: Path, step: int = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    path = root / f"step_{step}" if step is not None else latest_checkpoint(root)
    if path is None or not (path / "COMPLETE").exists():
        raise UserError(f"no complete checkpoint{' step_' + str(step) if step is not None else ''} in {root} (a run "
                        f"directory holds checkpoints/step_N/COMPLETE)")
    return path


def ema_weights(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """The whole EMA, assembled from each rank's pieces (train/ema.py); a run with frozen parameters (LoRA's base),
    which have no EMA, takes them from the raw weights (consolidated only then)."""
    from conf.schema import from_yaml
    from train.checkpoint import shard_files
    from train.ema import consolidate_files

    cfg = from_yaml((checkpoint / "config.yaml").read_text())
    frozen = cfg.train.method == "dit" and cfg.model.lora.rank > 0
    return consolidate_files(shard_files(checkpoint, "ema"), raw_weights(checkpoint) if frozen else {})


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


def export_diffusers(run_dir, use_ema: bool = True, step: int = None, out: Path = None,
                     lora: str = "merged") -> Path:
    from safetensors.torch import save_file

    from conf.schema import from_yaml
    from models.lora import adapter_state, merged_state
    from models.wan_weights import save_diffusers

    checkpoint = checkpoint_path(Path(run_dir), step)
    cfg = from_yaml((checkpoint / "config.yaml").read_text())
    if cfg.model.arch != "wan":
        raise UserError(f"--format diffusers writes a WanTransformer3DModel: this run has model.arch={cfg.model.arch}")
    weights = ema_weights(checkpoint) if use_ema else raw_weights(checkpoint)
    dit = {name[len("dit."):]: tensor.float() for name, tensor in weights.items() if name.startswith("dit.")}
    out = Path(out or Path(run_dir) / "export" / f"{checkpoint.name}-diffusers")
    out.mkdir(parents=True, exist_ok=True)
    text_dim = dit["condition_embedder.text_embedder.linear_1.weight"].shape[1]
    rank, alpha = cfg.model.lora.rank, cfg.model.lora.scale_alpha
    if rank and lora == "adapters":
        adapters = {f"transformer.{name}": t.contiguous() for name, t in adapter_state(dit, rank, alpha).items()}
        save_file(adapters, str(out / "pytorch_lora_weights.safetensors"))
    else:
        save_diffusers(merged_state(dit, rank, alpha) if rank else dit, cfg.model, text_dim, out)
    shutil.copyfile(checkpoint / "config.yaml", out / "kino_config.yaml")
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
    parser = ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ema", action="store_true", default=True, help="export EMA weights (default)")
    which.add_argument("--raw", action="store_true", help="export the trained (non-EMA) weights")
    parser.add_argument("--step", type=at_least(0, "a checkpoint step"), default=None,
                        help="checkpoint step (default: latest)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--format", choices=("kino", "diffusers"), default="kino")
    parser.add_argument("--lora", choices=("merged", "adapters"), default="merged",
                        help="a LoRA run, --format diffusers: adapters merged into the weights, or the adapters alone")
    args = parser.parse_args(argv)
    which = "raw" if args.raw else "EMA"
    if args.format == "diffusers":
        out = export_diffusers(args.run_dir, use_ema=not args.raw, step=args.step, out=args.out, lora=args.lora)
        print(f"exported {which} weights to {out} as a diffusers WanTransformer3DModel"
              + (" LoRA" if (out / "pytorch_lora_weights.safetensors").exists() else ""))
        return
    out = export(args.run_dir, use_ema=not args.raw, step=args.step, out=args.out)
    print(f"exported {which} weights to {out / 'model.safetensors'} (+ config.yaml)")


if __name__ == "__main__":
    from conf.errors import run_command

    raise SystemExit(run_command("kino", main))
