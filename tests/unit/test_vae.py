import pytest
import torch

from models.vae import CausalVideoVAE, psnr, vae_loss


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return CausalVideoVAE(latent_channels=4, base_channels=8).eval()


def test_compression_is_4x_in_time_and_8x_in_space_and_images_work(vae):
    for frames in (1, 5, 9):
        x = torch.randn(2, 3, frames, 32, 48)
        reconstruction, mean, logvar = vae(x)
        assert mean.shape == (2, 4, 1 + (frames - 1) // 4, 4, 6)
        assert reconstruction.shape == x.shape and logvar.shape == mean.shape
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode_distribution(torch.randn(1, 3, 8, 32, 32))


def test_encoder_and_decoder_are_causal_in_time(vae):
    x = torch.randn(1, 3, 9, 16, 16)
    later_changed = x.clone()
    later_changed[:, :, 5:] += 1.0  # frames 5.. belong to the third latent frame only
    with torch.no_grad():
        mean, _ = vae.encode_distribution(x)
        mean2, _ = vae.encode_distribution(later_changed)
        assert torch.allclose(mean[:, :, :2], mean2[:, :, :2], atol=1e-6)
        assert not torch.allclose(mean[:, :, 2], mean2[:, :, 2])
        z2 = mean.clone()
        z2[:, :, 2] += 1.0
        assert torch.allclose(vae.decode(mean)[:, :, :5], vae.decode(z2)[:, :, :5], atol=1e-6)


def test_loss_and_psnr():
    x = torch.zeros(1, 3, 1, 4, 4)
    loss, recon, kl = vae_loss(x, x + 0.5, torch.zeros(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1), kl_weight=1.0)
    assert recon.item() == pytest.approx(0.25 + 0.05) and kl.item() == pytest.approx(0.0)
    assert loss.item() == pytest.approx(0.30)
    assert psnr(x, x + 0.2) == pytest.approx(10 * torch.log10(torch.tensor(4.0 / 0.04)).item(), rel=1e-5)


def test_block_shortcut_packs_spacetime_blocks_losslessly():
    from models.vae import BlockShortcut

    shortcut = BlockShortcut(latent_channels=4, temporal=4, spatial=8)
    x = torch.randn(2, 3, 8, 16, 24)
    packed = shortcut._pack(x, 4)
    assert packed.shape == (2, 3 * 4 * 8 * 8, 2, 2, 3)
    assert torch.equal(shortcut._unpack(packed, 4), x)
    # block (t=0, h=1, w=2) holds exactly the pixels of frames 0-3, rows 8-15, columns 16-23
    assert torch.equal(packed[0, :, 0, 1, 2].reshape(3, 4, 8, 8), x[0, :, 0:4, 8:16, 16:24])
