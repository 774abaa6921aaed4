"""Pretrained-model adapters, exercised with tiny randomly initialised models of the real classes,
saved to a temp dir and loaded back through our loaders (nothing comes from a hub)."""
import pytest
import torch

from models.autoencoder import DiffusersVideoAutoencoder, LatentNormalizer, build_autoencoder
from models.config import AutoencoderConfig, ModelConfig, TextEncoderConfig
from models.dit import TextToVideoModel, text_conditioner

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("frames", [1, 5])
def test_diffusers_wan_vae_loads_from_a_local_dir_and_round_trips_shapes(tiny_wan_vae, frames):
    vae = build_autoencoder(AutoencoderConfig(name="diffusers", path=str(tiny_wan_vae), latent_channels=4,
                                              temporal_factor=2, spatial_factor=4))
    assert isinstance(vae, DiffusersVideoAutoencoder)
    video = torch.randint(0, 256, (frames, 16, 24, 3), dtype=torch.uint8)
    latent = vae.encode(video)
    assert latent.shape == (4, 1 + (frames - 1) // 2, 4, 6)
    decoded = vae.decode(latent)
    assert decoded.shape == video.shape and decoded.dtype == torch.uint8
    # the published per-channel statistics are what normalise the latents
    raw = vae.network.encode(((video.permute(3, 0, 1, 2).float() / 127.5) - 1)[None]).latent_dist.mode()[0]
    expected = (raw - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(-1, 1, 1, 1)) / torch.tensor(
        [1.5, 2.0, 0.5, 1.0]).view(-1, 1, 1, 1)
    assert torch.allclose(latent, expected, atol=1e-5)


def test_a_frozen_diffusers_vae_runs_in_the_configured_dtype_and_hands_out_fp32(tiny_wan_vae):
    """model.autoencoder.dtype: auto is bf16 on CUDA, fp32 elsewhere; a bf16 VAE holds bf16 weights, its latents
    leave it in fp32 close to the fp32 VAE's, and it decodes to uint8 pixels."""
    video = torch.randint(0, 256, (5, 16, 24, 3), dtype=torch.uint8)
    latents = {}
    for dtype in ("fp32", "bf16"):
        vae = build_autoencoder(AutoencoderConfig(name="diffusers", path=str(tiny_wan_vae), latent_channels=4,
                                                  temporal_factor=2, spatial_factor=4, dtype=dtype)).to("cpu")
        assert {p.dtype for p in vae.network.parameters()} == {torch.bfloat16 if dtype == "bf16" else torch.float32}
        latents[dtype] = vae.encode(video)
        assert latents[dtype].dtype == torch.float32
        decoded = vae.decode(latents[dtype])
        assert decoded.shape == video.shape and decoded.dtype == torch.uint8
    assert torch.allclose(latents["bf16"], latents["fp32"], atol=0.1, rtol=0.05)
    assert not torch.equal(latents["bf16"], latents["fp32"])  # the bf16 one did run in bf16


def test_declared_factors_must_match_the_loaded_autoencoder(tiny_wan_vae):
    with pytest.raises(ValueError, match="declares"):
        build_autoencoder(AutoencoderConfig(name="diffusers", path=str(tiny_wan_vae), latent_channels=16,
                                            temporal_factor=4, spatial_factor=8))


def test_latent_normalisation_round_trips():
    norm = LatentNormalizer(3, [0.5, -1.0, 2.0], [2.0, 0.5, 1.0])
    z = torch.randn(3, 2, 4, 4)
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-6)
    with pytest.raises(ValueError, match="needs 3"):
        LatentNormalizer(3, [0.0], [1.0])


def test_frozen_t5_conditions_the_dit(tiny_t5):
    cfg = ModelConfig(dim=32, depth=1, heads=2, attention_backend="sdpa",
                      text=TextEncoderConfig(name="pretrained", path=str(tiny_t5), max_tokens=16))
    model = TextToVideoModel(cfg)
    assert model.text_encoder is None and model.dit.text_pool.in_features == 24
    text = text_conditioner(cfg).batch(["a red circle moving left", ""])
    assert text.embeddings.shape == (sum(text.lengths), 24) and text.lengths[1] == 1  # "" is just </s>
    assert not text.embeddings.requires_grad
    out = model([torch.randn(3, 2, 8, 8), torch.randn(3, 1, 8, 16)], torch.rand(2), text)
    assert out.shape == (2 * 2 * 2 + 2 * 4, 3 * 16)
    out.sum().backward()  # gradients reach the DiT only
    assert model.dit.final.weight.grad is not None


def test_captions_pad_with_zero_vectors_as_wan_was_trained(tiny_t5):
    plain = text_conditioner(ModelConfig(text=TextEncoderConfig(name="pretrained", path=str(tiny_t5), max_tokens=16)))
    padded = text_conditioner(ModelConfig(text=TextEncoderConfig(name="pretrained", path=str(tiny_t5), max_tokens=16,
                                                                 pad_to=16)))
    captions = ["a red circle moving left", ""]
    a, b = plain.batch(captions), padded.batch(captions)
    assert b.lengths == [16, 16] and b.max_len == 16 and b.embeddings.shape == (32, 24)
    for caption, start, n in ((0, 0, a.lengths[0]), (1, a.lengths[0], a.lengths[1])):
        ours = b.embeddings[16 * caption:16 * (caption + 1)]
        assert torch.equal(ours[:n], a.embeddings[start:start + n])  # the real tokens, then zeros
        assert not ours[n:].any()
