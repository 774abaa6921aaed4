"""The packed video DiT: exact packing, backends, shapes."""
import pytest
import torch

from models.attention import BackendUnavailable, resolve_backend, varlen_attention
from models.config import ModelConfig, TextEncoderConfig
from models.dit import TextToVideoModel, rope_3d, text_conditioner

CAPTIONS = ["a red circle moving left", "", "a blue square on a grey background"]


def tiny_model(seed=0, dtype=torch.float64, **overrides) -> TextToVideoModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, depth=2, heads=2, text=TextEncoderConfig(dim=32, depth=1, heads=2, max_tokens=32),
                      attention_backend="sdpa", **overrides)
    model = TextToVideoModel(cfg).to(dtype)
    # adaLN-Zero makes a fresh model output zeros; randomise those layers so the test can fail.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada" in name or "modulation" in name or name.startswith("dit.final.") or name.endswith(("attn.out.weight", "fc2.weight")):
                p.normal_(0, 0.2)
    return model


def clips(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 4, 16, 16, generator=g, dtype=dtype),
            torch.randn(3, 2, 12, 20, generator=g, dtype=dtype),
            torch.randn(3, 1, 20, 8, generator=g, dtype=dtype)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("conditioning", ["cross_attention", "joint"])
@pytest.mark.parametrize("modulation", ["per_block", "shared"])
def test_packed_batch_matches_each_sample_alone_in_outputs_and_gradients(conditioning, modulation, dtype, tolerance):
    model = tiny_model(conditioning=conditioning, modulation=modulation, dtype=dtype)
    latents, t = clips(dtype), torch.tensor([0.2, 0.5, 0.9], dtype=dtype)
    packed = model(latents, t, text_conditioner(model.cfg).batch(CAPTIONS))
    packed.pow(2).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone, start = [], 0
    for i, latent in enumerate(latents):
        out = model([latent], t[i:i + 1], text_conditioner(model.cfg).batch([CAPTIONS[i]]))
        out.pow(2).sum().backward()
        alone.append(out.detach())
    assert (packed.detach() - torch.cat(alone)).abs().max() < tolerance
    for name, p in model.named_parameters():  # gradients relative to their own scale (sums reach ~1e3)
        scale = max(1.0, float(p.grad.abs().max()))
        assert (packed_grads[name] - p.grad).abs().max() < tolerance * scale, name
    assert packed.abs().max() > 1e-3  # the comparison above was not between zeros


def test_patchify_round_trip_and_token_counts():
    model = tiny_model(patch_size=[2, 4, 4])
    latents = [torch.randn(3, 4, 16, 16), torch.randn(3, 2, 8, 12)]
    packed = model.dit.patchify(latents)
    assert packed.shape == (2 * 4 * 4 + 1 * 2 * 3, 3 * 2 * 4 * 4)
    for back, original in zip(model.dit.unpatchify(packed, [x.shape for x in latents]), latents):
        assert torch.equal(back, original)


def test_output_shapes_follow_each_clip_and_fresh_model_predicts_zero():
    torch.manual_seed(0)
    model = TextToVideoModel(ModelConfig(dim=32, depth=1, heads=2, text=TextEncoderConfig(dim=32, depth=1, heads=2)))
    latents = [torch.randn(3, 3, 8, 8), torch.randn(3, 1, 16, 4)]
    out = model(latents, torch.rand(2), text_conditioner(model.cfg).batch(["x", "y"]))
    shapes = [v.shape for v in model.dit.unpatchify(out, [x.shape for x in latents])]
    assert shapes == [torch.Size([3, 3, 8, 8]), torch.Size([3, 1, 16, 4])]
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: every block starts as identity, the head as zero


def test_rope_depends_on_each_clips_own_grid():
    cos, sin = rope_3d([(2, 3, 4), (1, 2, 2)], head_dim=16, theta=10000.0, device="cpu")
    assert cos.shape == (2 * 3 * 4 + 4, 8)
    # the second clip restarts at position (0, 0, 0): no rotation at its first token
    assert torch.allclose(cos[24], torch.ones(8)) and torch.allclose(sin[24], torch.zeros(8))


def test_sdpa_backend_agrees_with_reference():
    g = torch.Generator().manual_seed(0)
    lengths_q, lengths_k = [5, 17, 1], [3, 17, 9]
    q = torch.randn(sum(lengths_q), 4, 16, generator=g)
    k = torch.randn(sum(lengths_k), 4, 16, generator=g)
    v = torch.randn(sum(lengths_k), 4, 16, generator=g)
    cu_q = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 20, 29], dtype=torch.int32)
    ref = varlen_attention(q, k, v, cu_q, cu_k, 17, 17, "reference")
    fast = varlen_attention(q, k, v, cu_q, cu_k, 17, 17, "sdpa")
    assert (ref - fast).abs().max() < 1e-5


def test_auto_backend_is_sdpa_on_cpu_and_a_forced_unavailable_backend_is_a_clear_error():
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(BackendUnavailable, match="flash_attn.*not available on cpu"):
        resolve_backend("flash_attn", "cpu")


def test_word_tokens_are_stable_per_word_and_the_demo_vocabulary_has_no_collisions():
    from data.demo_set import BACKGROUNDS, COLOURS, MOTIONS, SHAPES
    from models.text_encoder import WordTokenizer

    tokenizer = WordTokenizer(max_tokens=16, vocab_size=4096)
    ids = tokenizer.encode("A Yellow square, moving down on a NAVY background")
    assert ids[0] == tokenizer.BOS and len(ids) == 10 and ids[1] == ids[7] == tokenizer.word_id("a")
    assert ids[2] == tokenizer.word_id("yellow") == 2 + __import__("zlib").crc32(b"yellow") % 4094
    words = {w for name in [*COLOURS, *SHAPES, *MOTIONS, *BACKGROUNDS, "a moving on background"] for w in name.split()}
    assert len({tokenizer.word_id(w) for w in words}) == len(words)
    assert tokenizer.encode("") == [tokenizer.BOS] and len(tokenizer.encode("w " * 40)) == 16


@pytest.mark.parametrize("conditioning", ["cross_attention", "joint"])
def test_shared_modulation_replaces_each_blocks_projection_by_offsets_and_starts_with_zero_gates(conditioning):
    """model.modulation=shared (Wan-style): one projection for the whole model, 6 d offsets a block; a fresh model
    still starts with every block's gates at zero, like adaLN-Zero."""
    from models.dit import parameter_count

    cfg = dict(dim=32, depth=3, heads=2, text=TextEncoderConfig(dim=32, depth=1, heads=2, max_tokens=32),
               attention_backend="sdpa", conditioning=conditioning)
    per_block, shared = TextToVideoModel(ModelConfig(**cfg)), TextToVideoModel(ModelConfig(modulation="shared", **cfg))
    d, streams = 32, 2 if conditioning == "joint" else 1
    saved = parameter_count(per_block) - parameter_count(shared)
    per_block_ada = sum(m.weight.numel() + m.bias.numel() for n, m in per_block.named_modules() if n.endswith(".ada"))
    assert saved == per_block_ada - (6 * d * d + 6 * d) - sum(
        p.numel() for n, p in shared.named_parameters() if n.endswith(".modulation"))
    assert not [n for n, _ in shared.named_parameters() if n.endswith(".ada.weight")]
    from models.dit import block_modulation

    cond = torch.randn(3, d)  # any conditioning: at init every gate is zero, so each block adds nothing through them
    table = shared.dit.shared_modulation(torch.nn.functional.silu(cond)).unflatten(-1, (6, -1))
    modulated = [m for m in shared.modules() if getattr(m, "modulation_chunks", 0) == 6]
    assert len(modulated) == 3 * streams - (streams - 1)  # the last caption stream only supplies keys and values
    for module in modulated:
        gates = block_modulation(module, table)
        assert torch.equal(gates[2], torch.zeros(3, d)) and torch.equal(gates[5], torch.zeros(3, d))


def test_a_frozen_pretrained_text_encoder_runs_in_the_configured_dtype_and_hands_out_fp32(tiny_t5):
    """model.text.dtype: auto is bf16 on CUDA (half of UMT5-XXL's 23 GB in fp32) and fp32 elsewhere; either way
    its embeddings leave it in fp32, and bf16 ones stay close to fp32 ones."""
    from models.precision import frozen_dtype

    assert frozen_dtype("auto", "cuda") == torch.bfloat16 and frozen_dtype("auto", "cpu") == torch.float32
    captions = ["a red circle moving left", "a blue square"]
    embeddings = {}
    for dtype in ("fp32", "bf16"):
        cfg = ModelConfig(text=TextEncoderConfig(name="pretrained", path=str(tiny_t5), dim=24, dtype=dtype))
        encoder = text_conditioner(cfg).to("cpu")
        assert next(encoder.network.parameters()).dtype == frozen_dtype(dtype, "cpu")
        embeddings[dtype] = encoder.batch(captions).embeddings
        assert embeddings[dtype].dtype == torch.float32
    assert torch.allclose(embeddings["bf16"], embeddings["fp32"], atol=0.05, rtol=0.05)
    assert not torch.equal(embeddings["bf16"], embeddings["fp32"])  # the bf16 one did run in bf16
