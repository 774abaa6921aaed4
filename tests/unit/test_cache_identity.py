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
