"""models/flops.py against torch's FlopCounterMode on the tiny model (forward + backward)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.config import ModelConfig
from models.dit import TextToVideoModel, text_conditioner
from models.flops import flops_per_batch, parameter_groups


def measured(latents, captions, conditioning="cross_attention", lora_rank=0):
    # The reference backend computes attention with einsum, which FlopCounterMode sees as bmm;
    # every other matmul (mm, addmm) is a linear layer.
    cfg = ModelConfig(attention_backend="reference", conditioning=conditioning)
    if lora_rank:  # adapters on the blocks' token projections and MLPs; every other weight frozen
        cfg.lora.rank, cfg.lora.targets = lora_rank, ["qkv", "qkv_proj", "out", "fc1", "fc2"]
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


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("conditioning", ["cross_attention", "joint"])
def test_dense_and_attention_flops_are_within_5_percent(conditioning, lora_rank):
    """Joint conditioning runs `text_in` and each block's text stream over caption tokens, and attends over N + M
    tokens; a frozen weight costs 4 FLOPs a token where a gradient flows through it and 2 where none does. The
    count before (every such weight over video tokens, 6 FLOPs each) was 1.73x the dense work measured here for
    joint conditioning, 1.54x for a LoRA, 2.66x for both."""
    latents = [torch.randn(3, 8, 32, 32), torch.randn(3, 4, 24, 40)]
    model, counts, samples = measured(latents, ["a red circle moving right", "a blue square"], conditioning,
                                      lora_rank)
    groups = parameter_groups(model)
    dense = sum(groups.per_video_token * n + groups.per_text_token * m + groups.per_sample for n, m in samples)
    total = flops_per_batch(model, samples)
    attention = total - dense
    assert abs(dense / (counts["mm"] + counts["addmm"]) - 1) < 0.05
    assert abs(attention / counts["bmm"] - 1) < 0.05


def test_packed_flops_are_summed_per_sample_not_over_the_packed_length():
    model = TextToVideoModel(ModelConfig())
    one = flops_per_batch(model, [(512, 20)])
    assert flops_per_batch(model, [(512, 20), (512, 20)]) == 2 * one
    assert flops_per_batch(model, [(1024, 40)]) > 2 * one  # attention is quadratic in a single clip
