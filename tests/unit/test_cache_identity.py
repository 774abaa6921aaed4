"""A latent cache records the dtype its frozen encoders ran in, as resolved on the machine (model.*.dtype=auto:
bf16 on CUDA, fp32 elsewhere); a cache from before the dtypes were recorded was encoded in fp32."""
from conf.schema import load_config
from data.latent_cache import CACHE_FORMAT, cache_problems, encoder_identity

VAE = ["experiment=demo", "model.autoencoder.name=causal_vae", "model.autoencoder.latent_channels=4",
       "model.autoencoder.temporal_factor=4", "model.autoencoder.spatial_factor=8"]


def manifest(cfg, identity):
    return {"cache": {"format": CACHE_FORMAT, "encoder": identity, "fps": cfg.data.fps,
                      "patch_size": list(cfg.model.patch_size)}}


def test_the_identity_holds_the_resolved_dtype_and_a_run_in_another_dtype_is_told():
    fp32 = load_config(VAE + ["model.autoencoder.dtype=auto"], check=False)
    bf16 = load_config(VAE + ["model.autoencoder.dtype=bf16"], check=False)
    assert encoder_identity(fp32.model)["autoencoder"]["dtype"] == "fp32"  # auto on this CPU machine
    assert cache_problems(manifest(fp32, encoder_identity(fp32.model)), fp32, []) == []
    problems = cache_problems(manifest(fp32, encoder_identity(fp32.model)), bf16, [])
    assert problems == ["encoder.autoencoder.dtype: the cache has 'fp32', the config gives 'bf16'"]


def test_a_cache_from_before_the_dtypes_were_recorded_reads_as_fp32():
    cfg = load_config(VAE, check=False)
    old = encoder_identity(cfg.model)
    del old["autoencoder"]["dtype"]
    assert cache_problems(manifest(cfg, old), cfg, []) == []
    bf16 = load_config(VAE + ["model.autoencoder.dtype=bf16"], check=False)
    assert cache_problems(manifest(cfg, old), bf16, []) == [
        "encoder.autoencoder.dtype: the cache has 'fp32', the config gives 'bf16'"]


def test_the_pixel_space_has_no_dtype_to_match():
    cfg = load_config(["experiment=demo"], check=False)
    assert cfg.model.autoencoder.name == "pixel" and "dtype" not in encoder_identity(cfg.model)["autoencoder"]


def test_the_cache_places_its_autoencoder_on_the_actors_device(tmp_path, monkeypatch):
    """The encoder actor puts its autoencoder where it encodes, as training does. It did not (a type check that no
    autoencoder passed): on a GPU actor the VAE encoded on the CPU. No GPU here: CUDA is reported present and the
    autoencoder's placement recorded instead of made (the only mock in this test)."""
    import torch

    from conf.schema import to_yaml
    from data.latent_cache import ShardEncoder
    from models.autoencoder import FrozenVideoAutoencoder

    cfg = load_config(VAE + ["model.autoencoder.dtype=bf16"], check=False)
    placed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(FrozenVideoAutoencoder, "to", lambda self, device: placed.append(str(device)) or self)
    encoder = ShardEncoder(to_yaml(cfg), 0, str(tmp_path), str(tmp_path / "cache"))
    assert encoder.device.type == "cuda" and placed[-1] == "cuda"  # built on the CPU, then placed
