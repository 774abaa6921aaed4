"""models/flops.py against torch's FlopCounterMode on the tiny model (forward + backward)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.config import ModelConfig
from models.dit import TextToVideoModel, text_conditioner
from models.flops import flops_per_batch, parameter_groups


def measured(latents, captions):
    # The reference backend computes attention with einsum, which FlopCounterMode sees as bmm;
    # every other matmul (mm, addmm) is a linear layer.
    cfg = ModelConfig(attention_backend="reference")
    torch.manual_seed(0)
    model = TextToVideoModel(cfg)
    text = text_conditioner(cfg).batch(captions)
    with FlopCounterMode(display=False) as counter:
        out = model(latents, torch.rand(len(latents)), text)
        out.pow(2).mean().backward()
    counts = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    video_tokens = [model.dit.grid(x.shape)[0] * model.dit.grid(x.shape)[1] * model.dit.grid(x.shape)[2]
                    for x in latents]
    return model, counts, list(zip(video_tokens, text.lengths))


def test_dense_and_attention_flops_are_within_5_percent():
    latents = [torch.randn(3, 8, 32, 32), torch.randn(3, 4, 24, 40)]
    model, counts, samples = measured(latents, ["a red circle moving right", "a blue square"])
    groups = parameter_groups(model)
    dense = sum(6 * (groups.per_video_token * n + groups.per_text_token * m + groups.per_sample) for n, m in samples)
    total = flops_per_batch(model, samples)
    attention = total - dense
    assert abs(dense / (counts["mm"] + counts["addmm"]) - 1) < 0.05
    assert abs(attention / counts["bmm"] - 1) < 0.05


def test_packed_flops_are_summed_per_sample_not_over_the_packed_length():
    model = TextToVideoModel(ModelConfig())
    one = flops_per_batch(model, [(512, 20)])
    assert flops_per_batch(model, [(512, 20), (512, 20)]) == 2 * one
    assert flops_per_batch(model, [(1024, 40)]) > 2 * one  # attention is quadratic in a single clip
