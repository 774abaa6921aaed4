"""A latent cache trains a sample drawn as an image on its clip's first latent frame (data/loader.py
prepare_cached_sample). That is only right where the autoencoder encodes the first frame alone: checked here
for the built-in causal VAE and diffusers' Wan VAE, with random weights, against encoding the first frame by
itself. A cached stage with images is refused for any other diffusers autoencoder (data/latent_cache.py)."""
import torch

from models.autoencoder import build_autoencoder
from models.config import AutoencoderConfig


def first_latent_frame_error(autoencoder, frames: int) -> float:
    torch.manual_seed(0)
    clip = torch.randint(0, 256, (frames, 16, 16, 3), dtype=torch.uint8)
    whole = autoencoder.encode_batch([clip])[0]
    alone = autoencoder.encode_batch([clip[:1]])[0]
    assert alone.shape[1] == 1
    return (whole[:, :1] - alone).abs().max().item() / alone.abs().max().item()


def test_the_builtin_causal_vae_encodes_the_first_frame_alone():
    cfg = AutoencoderConfig(name="causal_vae", latent_channels=4, temporal_factor=2, spatial_factor=4,
                            base_channels=8, channel_mult=[1, 2], temporal_downsample=[False, True])
    assert first_latent_frame_error(build_autoencoder(cfg), 9) < 1e-5


def test_the_diffusers_wan_vae_encodes_the_first_frame_alone(tiny_wan_vae):
    cfg = AutoencoderConfig(name="diffusers", path=str(tiny_wan_vae), latent_channels=4, temporal_factor=2,
                            spatial_factor=4)
    assert first_latent_frame_error(build_autoencoder(cfg), 9) < 1e-4


def test_a_golden_non_causal_encoder_fails_the_check():
    class Averaging:  # every latent frame sees the whole clip
        def encode_batch(self, videos):
            return [v.float().mean(dim=(0,), keepdim=True).permute(3, 0, 1, 2).expand(-1, (len(v) + 1) // 2, -1, -1)
                    for v in videos]

    assert first_latent_frame_error(Averaging(), 9) > 1e-2


def test_only_autoencoders_known_to_be_causal_count_as_encoding_the_first_frame_alone(tmp_path):
    import json

    from data.latent_cache import first_frame_alone

    wan, other = tmp_path / "wan", tmp_path / "other"
    for path, name in ((wan, "AutoencoderKLWan"), (other, "AutoencoderKLMochi")):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"_class_name": name}))
    ae = dict(name="diffusers", latent_channels=4, temporal_factor=4, spatial_factor=8)
    assert first_frame_alone(AutoencoderConfig(path=str(wan), **ae))
    assert not first_frame_alone(AutoencoderConfig(path=str(other), **ae))
    assert first_frame_alone(AutoencoderConfig(name="causal_vae"))
