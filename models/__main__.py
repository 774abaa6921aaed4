"""`python -m models [model=NAME ...]`: parameter counts and FLOPs per sample of model configs.

Models are built on the meta device, so a 7B config costs no memory. With no
`model=` override every config in conf/model/ is listed.
"""
import sys
import tempfile
from pathlib import Path

import torch

from models.dit import TextToVideoModel, parameter_count
from models.flops import flops_per_sample


def describe(overrides):
    from conf.schema import load_config

    cfg = load_config(overrides, check=False).model
    if cfg.text.name == "pretrained" and not cfg.text.path:  # Wan's configs leave the UMT5 directory to the user
        stand_in = Path(tempfile.mkdtemp(prefix="kino-umt5-width-"))
        (stand_in / "config.json").write_text('{"d_model": 4096}')  # UMT5-XXL's width
        cfg.text.path = str(stand_in)
    with torch.device("meta"):
        model = TextToVideoModel(cfg)
    text = parameter_count(model.text_encoder) if model.text_encoder is not None else 0
    tokens = 16384  # e.g. 33 frames at 480x832 on a 4x8x8 VAE with 1x2x2 patches is ~ 16k tokens
    return (cfg.name, parameter_count(model), parameter_count(model.dit), text,
            flops_per_sample(model, tokens, min(cfg.text.max_tokens, 128)))


def main(argv):
    names = [a.split("=", 1)[1] for a in argv if a.startswith("model=")]
    if not names:
        names = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml"))
        rows = [describe([f"model={n}", *argv]) for n in names]
    else:
        rows = [describe(argv)]
    print(f"{'model':<11} {'params':>10} {'DiT':>10} {'text enc':>10} {'TFLOP/sample@16k tok':>22}")
    for name, total, dit, text, flops in sorted(rows, key=lambda r: r[1]):
        print(f"{name:<11} {total / 1e6:>9.1f}M {dit / 1e6:>9.1f}M {text / 1e6:>9.1f}M {flops / 1e12:>22.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
