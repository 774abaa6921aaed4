"""model.image.inputs=pipeline (models/conditioning.py): which pixel frames each mode gives and the mask laid out as
diffusers' WanImageToVideoPipeline lays out `mask_lat_size`; a text-only clip's input; the grey clip's latents kept
per shape. tests/integration/test_wan_i2v.py compares the whole input with the pipeline's own."""
import pytest
import torch

from models.conditioning import given_frames, given_pixels, pipeline_input, pipeline_mask, text_only_input


def pipelines_mask(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """WanImageToVideoPipeline.prepare_latents' mask_lat_size for one clip, its steps written out: (factor, T)."""
    mask = pixels.float().view(1, 1, -1, 1, 1)
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=factor)
    mask = torch.concat([first, mask[:, :, 1:]], dim=2)
    return mask.view(1, -1, factor, 1, 1).transpose(1, 2)[0, :, :, 0, 0]


def test_each_mode_gives_its_pixel_frames_and_the_mask_is_the_pipelines():
    g = torch.Generator().manual_seed(0)
    bits = lambda *on: [i in on for i in range(17)]  # noqa: E731 (5 latent frames of a temporal factor of 4)
    assert given_pixels(given_frames("first_frame", 5, g), 4).tolist() == bits(0)  # the pipeline's image
    assert given_pixels(given_frames("last_frame", 5, g), 4).tolist() == bits(16)  # FLF2V's last image
    assert given_pixels(given_frames("first_last", 5, g), 4).tolist() == bits(0, 16)
    assert not given_pixels(given_frames("text", 5, g), 4).any()
    stretch = torch.tensor([True, True, False, False, False])  # extend: the pixel frames of two latent frames
    assert given_pixels(stretch, 4).tolist() == bits(*range(5))
    assert given_pixels(stretch.flip(0), 4).tolist() == bits(*range(12, 17))  # extend_backward: as many, at the end
    assert given_pixels(torch.tensor([True, True]), 4).tolist() == [True, False, False, False, True]  # first_last on 2
    assert given_pixels(torch.tensor([True, False, True]), 1).tolist() == [True, False, True]  # no compression
    with pytest.raises(ValueError, match="leading and/or a trailing stretch"):
        given_pixels(torch.tensor([False, True, False]), 4)
    for given in ([1, 0, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0] * 5):
        pixels = given_pixels(torch.tensor(given, dtype=torch.bool), 4)
        mask = pipeline_mask(pixels, 4, 2, 3)
        assert mask.shape == (4, 5, 2, 3) and torch.equal(mask[..., 0, 0], pipelines_mask(pixels, 4)), given
    last = pipeline_mask(given_pixels(torch.tensor([1, 0, 0, 0, 1], dtype=torch.bool), 4), 4, 1, 1)[:, :, 0, 0]
    assert last.t().tolist() == [[1, 1, 1, 1], [0] * 4, [0] * 4, [0] * 4, [0, 0, 0, 1]]


def test_an_input_is_the_noisy_latents_the_mask_and_the_condition_and_a_text_only_clip_reads_the_grey_clip():
    from conf.schema import load_config

    noisy, condition = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    x = pipeline_input(noisy, condition, torch.tensor([True, False, False]), 2)
    assert x.shape == (10, 3, 2, 2) and torch.equal(x[:4], noisy) and torch.equal(x[6:], condition)
    assert x[4:6, 0].eq(1).all() and x[4:6, 1:].eq(0).all()
    cfg = load_config(["model.arch=wan", "model.frame_conditioning=true", "model.image.path=clip",
                       "model.autoencoder.latent_channels=4", "model.autoencoder.temporal_factor=2"], check=False).model
    with pytest.raises(ValueError, match="grey clip's latents"):
        text_only_input(cfg, noisy)
    x = text_only_input(cfg, noisy, condition)
    assert torch.equal(x[:4], noisy) and x[4:6].eq(0).all() and torch.equal(x[6:], condition)
    cfg.image.inputs = "kino"
    assert text_only_input(cfg, noisy)[6:].eq(0).all()


def test_the_grey_clip_is_encoded_once_per_shape(tiny_wan_vae):
    from models.autoencoder import DiffusersVideoAutoencoder, PixelSpace

    autoencoder = DiffusersVideoAutoencoder(str(tiny_wan_vae))
    calls = []
    encode = autoencoder._encode
    autoencoder._encode = lambda x: calls.append(tuple(x.shape)) or encode(x)
    blank = autoencoder.blank((4, 3, 2, 2))
    assert autoencoder.blank((4, 3, 2, 2)) is blank and calls == [(1, 3, 5, 8, 8)]  # 5 frames of 8 x 8 pixels
    # The mid-grey clip: 0 in [-1, 1], what a uint8 clip cannot hold (127 and 128 are either side of it).
    grey = torch.zeros(5, 8, 8, 3)
    assert torch.equal(blank, autoencoder.encode_batch([grey])[0])
    assert not torch.allclose(blank, autoencoder.encode(torch.full((5, 8, 8, 3), 127, dtype=torch.uint8)))
    assert autoencoder.blank((4, 5, 2, 2)).shape == (4, 5, 2, 2) and calls[-1] == (1, 3, 9, 8, 8)  # another shape
    assert PixelSpace().blank((3, 2, 4, 4)).eq(0).all()
