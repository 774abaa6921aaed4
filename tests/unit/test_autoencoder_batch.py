"""Frozen autoencoders encode a micro-batch of mixed-shape clips one network call per shape, giving each clip the
latent it gets alone, in the clips' order."""
import torch

from models.autoencoder import BuiltinVAE, PixelSpace, to_unit_range
from models.config import AutoencoderConfig


def clips():
    g = torch.Generator().manual_seed(0)
    shapes = [(9, 16, 16), (5, 8, 24), (9, 16, 16), (1, 16, 16), (5, 8, 24)]
    return [torch.randint(0, 256, (*s, 3), dtype=torch.uint8, generator=g) for s in shapes]


def test_the_builtin_vae_encodes_by_shape_as_it_encodes_each_clip_alone():
    torch.manual_seed(0)
    vae = BuiltinVAE(AutoencoderConfig(name="causal_vae", latent_channels=4, base_channels=8, channel_mult=[1, 2],
                                       temporal_downsample=[False, True], latent_mean=[0.1, 0.0, -0.2, 0.3],
                                       latent_std=[1.0, 2.0, 0.5, 1.5]))
    calls = []
    encode = vae._encode
    vae._encode = lambda x: calls.append(x.shape[0]) or encode(x)
    videos = clips()
    batched = vae.encode_batch(videos)
    assert calls == [2, 2, 1]  # three shapes: one call each, the repeated shapes together
    calls.clear()
    vae.clips_per_call = 1  # model.autoencoder.encode_batch=1: one clip a call, the same latents
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(vae.encode_batch(videos), batched)) and calls == [1] * 5
    for video, latent in zip(videos, batched):
        alone = vae.encode(video)
        assert latent.shape == alone.shape and torch.allclose(latent, alone, atol=1e-5)


def test_pixel_space_batch_is_each_clip_in_unit_range():
    videos = clips()
    for video, latent in zip(videos, PixelSpace().encode_batch(videos)):
        assert torch.equal(latent, to_unit_range(video))
