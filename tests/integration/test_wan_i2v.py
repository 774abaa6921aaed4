"""model.arch=wan with image conditioning (Wan 2.1 I2V and FLF2V) against diffusers' WanTransformer3DModel and
transformers' CLIPVisionModel: tiny random configs saved to a temp dir (no hub). Kino's packed forward equals
diffusers' per clip, each clip with its own image tokens; the frozen CLIP gives the pipeline's hidden_states[-2];
the export loads in diffusers; a fine-tune from the I2V weights trains and comes back out (the round trip)."""
import json

import pytest
import torch

from conf.schema import ConfigError, load_config
from models.dit import TextToVideoModel
from models.layers import cu_seqlens_from_lengths
from models.text_encoder import TextBatch
from models.wan_weights import WeightsMismatch, check_matches, load_diffusers, save_diffusers

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# Wan I2V at toy size: 4 latent channels and a temporal factor of 2 give 4 + 2 + 4 = 10 input channels (Wan's 36 =
# 16 + 4 + 16); a CLIP of width 32 with 17 tokens an image (Wan's: 1280 and 257).
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
TOKENS = (32 // 8) ** 2 + 1
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=10, out_channels=4,
           text_dim=24, freq_dim=256, ffn_dim=80, num_layers=2, image_dim=32, added_kv_proj_dim=48)
TEXT_TOKENS = 512  # diffusers' I2V attention takes the last 512 context tokens as the caption's (Wan's padding)


def kino_overrides(clip_dir, images=1):
    return ["model.arch=wan", "model.dim=48", "model.heads=4", "model.depth=2", "model.ffn_dim=80",
            "model.patch_size=[1,2,2]", "model.autoencoder.latent_channels=4", "model.autoencoder.temporal_factor=2",
            "model.text.dim=24", "model.text.heads=2", "model.text.depth=1", "model.attention_backend=reference",
            "model.frame_conditioning=true", f"model.image.path={clip_dir}", "model.image.dim=32",
            f"model.image.tokens={TOKENS}", f"model.image.images={images}"]


SHAPES = [(10, 3, 8, 12), (10, 1, 6, 6), (10, 5, 4, 4)]  # (C, T, H, W): the model's input channels


def save_random_clip(path, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP))
    model.save_pretrained(path)
    return model.eval()


def save_random_wan_i2v(path, images=1, seed=0):
    torch.manual_seed(seed)
    flf2v = dict(pos_embed_seq_len=2 * TOKENS) if images == 2 else {}
    model = diffusers.WanTransformer3DModel(**WAN, **flf2v)
    with torch.no_grad():  # off the zero output projection and position embedding: every output is compared
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model.eval()


def packed_inputs(images=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=generator) for shape in SHAPES]
    captions = [torch.randn(TEXT_TOKENS, 24, generator=generator) for _ in SHAPES]
    image_tokens = torch.randn(len(SHAPES), images * TOKENS, 32, generator=generator)
    t = torch.tensor([0.3, 0.7, 0.95])
    lengths = [TEXT_TOKENS] * len(SHAPES)
    text = TextBatch(None, None, cu_seqlens_from_lengths(lengths, None), TEXT_TOKENS, lengths,
                     embeddings=torch.cat(captions), images=image_tokens)
    return inputs, t, captions, text


def kino_i2v(wan_dir, clip_dir, images=1):
    cfg = load_config(kino_overrides(clip_dir, images), check=False).model
    model = TextToVideoModel(cfg).eval()
    missing, unexpected = model.dit.load_state_dict(load_diffusers(wan_dir, cfg), strict=False)
    assert unexpected == [] and missing == []
    return model


def diffusers_per_clip(wan, inputs, t, captions, image_tokens, images=1):
    with torch.no_grad():  # FLF2V: the two images' tokens as a batch of two, as its pipeline passes them
        return [wan(hidden_states=x[None], timestep=ti[None] * 1000, encoder_hidden_states=c[None],
                    encoder_hidden_states_image=i.view(images, TOKENS, -1), return_dict=False)[0][0]
                for x, ti, c, i in zip(inputs, t, captions, image_tokens)]


def kino_per_clip(model, inputs, t, text):
    with torch.no_grad():
        out = model.dit(inputs, t, text.embeddings, text)
        return model.dit.unpatchify(out, [(4, *x.shape[1:]) for x in inputs])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "image_encoder"
    save_random_clip(path)
    return path


@pytest.mark.parametrize("images", [1, 2], ids=["i2v", "flf2v"])
def test_kino_wan_i2v_equals_diffusers_for_each_clip_of_a_packed_batch(tmp_path, clip_dir, images):
    wan = save_random_wan_i2v(tmp_path / "wan", images)
    model = kino_i2v(tmp_path / "wan", clip_dir, images)
    inputs, t, captions, text = packed_inputs(images)
    ours = kino_per_clip(model, inputs, t, text)
    theirs = diffusers_per_clip(wan, inputs, t, captions, text.images, images)
    for a, b in zip(ours, theirs):
        assert b.abs().max() > 0.1
        assert (a - b).abs().max() < 1e-5
    # Each clip reads its own image: another clip's tokens change its output.
    swapped = TextBatch(**{**text.__dict__, "images": text.images.roll(1, dims=0)})
    assert (kino_per_clip(model, inputs, t, swapped)[0] - ours[0]).abs().max() > 1e-3
    config = json.loads((tmp_path / "wan" / "config.json").read_text())
    assert (config["in_channels"], config["added_kv_proj_dim"]) == (10, 48)


def test_the_frozen_clip_gives_the_pipelines_penultimate_hidden_states(clip_dir):
    from models.image_encoder import ImageEncoder

    cfg = load_config(kino_overrides(clip_dir), check=False).model
    encoder = ImageEncoder(cfg.image)
    reference = transformers.CLIPVisionModel.from_pretrained(clip_dir).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    frames = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    frames[1, :, :8] = 0  # the crop keeps the centre: what lies outside it does not count
    ours = encoder.encode([f[:, 8:40] for f in frames])
    pixels = processor(images=[f[:, 8:40].numpy() for f in frames], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (2, TOKENS, 32) and (ours - theirs).abs().max() < 1e-5
    assert torch.equal(encoder.encode(frames), ours)  # the shortest side at image_size: a centre crop
    assert not any(p.requires_grad for p in encoder.network.parameters())
    black = encoder.black()
    assert torch.equal(black, encoder.encode([torch.zeros(32, 32, 3, dtype=torch.uint8)])[0])


def test_which_frames_a_clip_gives_clip_by_mode():
    from models.image_encoder import image_slots

    g = lambda *bits: torch.tensor(bits, dtype=torch.bool)  # noqa: E731
    assert image_slots(g(1, 0, 0), 1) == ["first"] and image_slots(g(1, 0, 0), 2) == ["first", None]
    assert image_slots(g(0, 0, 1), 1) == ["last"] and image_slots(g(0, 0, 1), 2) == [None, "last"]
    assert image_slots(g(1, 0, 1), 1) == ["first"] and image_slots(g(1, 0, 1), 2) == ["first", "last"]
    assert image_slots(g(1, 1, 0), 1) == ["first"]  # extend: the given stretch starts with the first frame
    assert image_slots(g(0, 0, 0), 1) == [None] and image_slots(g(0, 0, 0), 2) == [None, None]  # the black image


def test_the_export_is_what_diffusers_loads_and_a_t2v_directory_is_refused(tmp_path, clip_dir):
    save_random_wan_i2v(tmp_path / "wan")
    model = kino_i2v(tmp_path / "wan", clip_dir)
    with torch.no_grad():  # as if trained: every weight moved
        for p in model.dit.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_diffusers(model.dit.state_dict(), model.cfg, 24, tmp_path / "out")
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    inputs, t, captions, text = packed_inputs(seed=2)
    for ours, theirs in zip(kino_per_clip(model, inputs, t, text),
                            diffusers_per_clip(loaded, inputs, t, captions, text.images)):
        assert (ours - theirs).abs().max() < 1e-5
    t2v = dict(WAN, in_channels=4, image_dim=None, added_kv_proj_dim=None)
    diffusers.WanTransformer3DModel(**t2v).save_pretrained(tmp_path / "t2v")
    with pytest.raises(WeightsMismatch) as error:
        check_matches(tmp_path / "t2v", model.cfg, 24)
    message = str(error.value)
    assert "in_channels: the directory has 4, the config gives 10" in message
    assert "image_dim: the directory has None, the config gives 32" in message
    assert "missing tensor condition_embedder.image_embedder.ff.net.0.proj.weight" in message
    assert "missing tensor blocks.0.attn2.add_k_proj.weight" in message


FIRST_FRAMES = ["curriculum.stages.0.conditioning.text=0.5", "++curriculum.stages.0.conditioning.first_frame=0.5"]


def test_image_conditioning_configs_that_cannot_run_are_refused(clip_dir):
    base = [*kino_overrides(clip_dir), "model.autoencoder.temporal_factor=1",  # the demo curriculum's 8 frames
            "curriculum.stages.0.token_budget=8192", "curriculum.stages.1.token_budget=8192", *FIRST_FRAMES]
    assert load_config(base).model.image.path == str(clip_dir)
    for overrides, match in ((["model.arch=kino"], "model.image.path: the CLIP image branch is Wan 2.1 I2V's"),
                             (["model.frame_conditioning=false"], "set model.frame_conditioning=true"),
                             (["model.image.images=3"], "model.image.images=3: 1"),
                             (["model.image.dtype=fp16"], "model.image.dtype='fp16'"),
                             (["model.image.tokens=0"], "must be positive")):
        with pytest.raises(ConfigError, match=match):
            load_config([*base, *overrides])
    # model.image.inputs: what the DiT reads beside the noisy latents (models/conditioning.py); pipeline by default.
    from models.conditioning import pipeline_inputs

    assert pipeline_inputs(load_config(base).model)
    assert not pipeline_inputs(load_config([*base, "model.image.inputs=kino"]).model)
    assert not pipeline_inputs(load_config(["experiment=demo"]).model)  # Kino's DiT keeps its own layout
    with pytest.raises(ConfigError, match="model.image.inputs='diffusers': pipeline"):
        load_config([*base, "model.image.inputs=diffusers"])
    # A latent cache does not hold the condition of every stretch an extension mode draws.
    extending = [*base, "curriculum.stages.0.conditioning.text=0.25", "++curriculum.stages.0.conditioning.extend=0.25"]
    assert load_config(extending).curriculum.stages[0].conditioning["extend"] == 0.25  # from the videos
    for cache in ("data.latents=/caches/a", "curriculum.stages.0.latents=/caches/a"):
        with pytest.raises(ConfigError, match=r"curriculum.stages\[0\].conditioning trains extend from the latent "
                                              r"cache /caches/a"):
            load_config([*extending, cache])
    load_config([*extending, "data.latents=/caches/a", "model.image.inputs=kino"])  # Kino's layout: from the cache
    load_config([*base, "tracking.eval_clips=2", "data.validation_root=/data/held-out"])  # scored as it reads them
    # Wan with conditioning frames and no image branch: a 2 x latent + mask channel input, no CLIP.
    plain = load_config([o for o in base if not o.startswith("model.image.path")]).model
    assert plain.frame_conditioning and plain.image.path is None
    # Where the run starts (python -m train, launch local): the directory is a CLIP of the configured shape.
    from train.preflight import check_image_encoder

    check_image_encoder(load_config(base))
    with pytest.raises(ConfigError, match=r"model.image.dim=1280, the encoder's hidden_size is 32; "
                                          r"model.image.tokens=257, the encoder gives 17"):
        check_image_encoder(load_config([*base, "model.image.dim=1280", "model.image.tokens=257"]))
    with pytest.raises(ConfigError, match="no config.json"):
        check_image_encoder(load_config([*base, f"model.image.path={clip_dir.parent / 'elsewhere'}"]))


def test_a_t5_directory_is_no_image_encoder(tiny_t5, clip_dir):
    from train.preflight import check_image_encoder

    base = [*kino_overrides(tiny_t5), "model.autoencoder.temporal_factor=1", "curriculum.stages.0.token_budget=8192",
            "curriculum.stages.1.token_budget=8192", *FIRST_FRAMES]
    with pytest.raises(ConfigError, match="a 't5' model, not a CLIPVisionModel"):
        check_image_encoder(load_config(base))


# -- the round trip: python -m train from diffusers' I2V weights (2 CPU ranks, ZeRO-2), then --format diffusers ------
def i2v_run(dataset, wan_dir, clip_dir, text_dir, vae_dir, run_dir, *extra, steps=(4, 2)):
    """test_wan.py's Wan fine-tune with conditioning frames and CLIP: stage 0 gives first frames, both ends or
    nothing, stage 1 last frames or nothing (the clip's last frame through CLIP, or the black image)."""
    from tests.integration.test_wan import run_overrides

    mixes = [{"text": 0.25, "first_frame": 0.5, "first_last": 0.25}, {"text": 0.5, "last_frame": 0.5}]
    modes = [f"++curriculum.stages.{i}.conditioning.{m}={v}" for i, mix in enumerate(mixes) for m, v in mix.items()]
    image = ["model.frame_conditioning=true", f"model.image.path={clip_dir}", "model.image.dim=32",
             f"model.image.tokens={TOKENS}", "model.autoencoder.temporal_factor=2"]
    return run_overrides(dataset, wan_dir, text_dir, vae_dir, run_dir, *image, *modes, *extra, steps=steps)


def test_a_wan_i2v_finetune_goes_in_through_init_from_and_out_to_diffusers(
        tiny_dataset, tiny_t5, tiny_wan_vae, clip_dir, tmp_path):
    from tests.integration.test_wan import ema_dit, torchrun_train
    from models.weights import weights_sha256
    from train.export import main as export_main

    save_random_wan_i2v(tmp_path / "wan")
    run_dir = tmp_path / "run"
    overrides = i2v_run(tiny_dataset, tmp_path / "wan", clip_dir, tiny_t5, tiny_wan_vae, run_dir)
    result = torchrun_train([*overrides, "train.stop_after_steps=3"])  # stopped, then resumed to the end
    assert f"sha256 {weights_sha256(tmp_path / 'wan')}" in result.stdout
    result = torchrun_train(overrides)
    assert "resuming from" in result.stdout + result.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6
    cfg = load_config(kino_overrides(clip_dir), check=False).model
    base, trained = load_diffusers(tmp_path / "wan", cfg), ema_dit(run_dir, 6)
    assert sorted(base) == sorted(trained)
    moved = {k: (trained[k] - base[k]).abs().max().item() for k in base}
    assert 1e-5 < max(moved.values()) < 1.0
    # The image branch trained: its tokens reached every block's added projections and the embedder.
    for name in ("blocks.0.attn2.add_k_proj.weight", "blocks.1.attn2.add_v_proj.weight",
                 "condition_embedder.image_embedder.ff.net.0.proj.weight"):
        assert moved[name] > 1e-6, name
    export_main([str(run_dir), "--format", "diffusers", "--out", str(tmp_path / "export")])
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "export").eval()
    assert loaded.config.in_channels == 10 and loaded.config.image_dim == 32
    model = TextToVideoModel(cfg).eval()
    model.dit.load_state_dict(trained)
    inputs, t, captions, text = packed_inputs(seed=4)
    for ours, theirs in zip(kino_per_clip(model, inputs, t, text),
                            diffusers_per_clip(loaded, inputs, t, captions, text.images)):
        assert (ours - theirs).abs().max() < 1e-5


def test_a_latent_cache_keeps_the_first_and_last_frames_clip_tokens_and_the_trainer_reads_them(
        tiny_dataset, tiny_t5, tiny_wan_vae, clip_dir, tmp_path):
    """A cache of an I2V run holds CLIP's tokens of each clip's first and last frames (what its given frames read
    instead of pixels) and records the image encoder's identity; the trainer fills each clip's slots from pixels or
    from those tokens alike, the black image's where no frame is given."""
    from types import SimpleNamespace

    import webdataset as wds

    from conf.schema import to_yaml
    from data.batch import PackedBatch
    from data.latent_cache import ShardEncoder, encoder_identity
    from data.loader import prepare_sample
    from models.dit import text_conditioner
    from models.weights import weights_sha256
    from train.sequence_parallel import SequenceLayout
    from train.trainer import Trainer

    cfg = load_config([*i2v_run(tiny_dataset, tmp_path / "wan", clip_dir, tiny_t5, tiny_wan_vae, tmp_path / "run"),
                       "model.text.pad_to=null"], check=False)
    identity = encoder_identity(cfg.model)["image"]
    assert identity["weights_sha256"] == weights_sha256(clip_dir) and "images" not in identity  # either holds both
    row = json.loads((tiny_dataset / "manifest.json").read_text())["shards"][0]
    (tmp_path / "cache").mkdir()
    encoder = ShardEncoder(to_yaml(cfg), 0, str(tiny_dataset), str(tmp_path / "cache"))
    encoder.encode_shard(row["path"], 0, row["num_samples"])
    cached_raw = list(wds.tarfile_samples([{"url": str(tmp_path / "cache" / row["path"])}]))
    video_raw = list(wds.tarfile_samples([{"url": str(tiny_dataset / row["path"])}]))
    n = next(i for i, s in enumerate(cached_raw) if "latent.npy" in s)
    cached, _ = prepare_sample(cached_raw[n], (0, 0, n), encoder.spec)
    video, _ = prepare_sample(video_raw[n], (0, 0, n), encoder.spec)  # the same sample, crop and frames
    images = encoder.images
    assert cached.image_embedding.shape == (2, TOKENS, 32)
    assert torch.allclose(cached.image_embedding, images.encode([video.video[0], video.video[-1]]), atol=1e-5)

    conditioner = text_conditioner(cfg.model)
    trainer = SimpleNamespace(text=conditioner, cfg=cfg, layout=SequenceLayout(1, 0, 1),
                              env=SimpleNamespace(device=torch.device("cpu")))
    batch = PackedBatch([video, cached, video], [], "rank0-worker0", None)
    frames = video.video.shape[0] // 2 + 1  # latent frames (temporal factor 2)
    mask = lambda *given: torch.tensor([i in given for i in range(frames)])  # noqa: E731
    tokens = Trainer.image_tokens(trainer, batch, [mask(0), mask(frames - 1), mask()])
    expected = [images.encode([video.video[0]])[0], cached.image_embedding[1], images.black()]
    assert tokens.shape == (3, TOKENS, 32)
    assert all(torch.allclose(row, want, atol=1e-5) for row, want in zip(tokens, expected))
    # What a caption batch carries before any frame is given: the black image for every clip.
    assert torch.equal(conditioner.batch(["a", "b"]).images, images.black().expand(2, TOKENS, 32))

    # model.image.inputs=pipeline (the default): the cache keeps what a given first frame, last frame or both
    # condition on (condition.npy), and the conditions built from it are those built from the clip's pixels; the grey
    # clip's latents (nothing given, and before a last frame) come from the autoencoder, once per shape.
    from models.autoencoder import build_autoencoder
    from models.conditioning import condition_latents

    autoencoder = build_autoencoder(cfg.model.autoencoder)
    assert cached.condition.shape == (4, frames + 2, 8, 8) and cached.video.shape == (4, frames, 8, 8)
    shape, cpu = [cached.video.shape], torch.device("cpu")
    for given in (mask(0), mask(frames - 1), mask(0, frames - 1), mask()):
        from_pixels, = condition_latents(autoencoder, [video.video], [given], shape, cpu)
        from_cache, = condition_latents(autoencoder, [cached.condition], [given], shape, cpu)
        assert from_pixels.abs().max() > 0.1 and (from_cache - from_pixels).abs().max() < 1e-5, given
    assert torch.equal(condition_latents(autoencoder, [None], [mask()], shape, cpu)[0], autoencoder.blank(shape[0]))
    with pytest.raises(ValueError, match="extend and extend_backward from the videos"):
        condition_latents(autoencoder, [cached.condition], [mask(0, 1)], shape, cpu)
    sources = [c.condition if c.encoded else c.video for c in batch.clips]  # what the trainer passes
    built = condition_latents(autoencoder, sources, [mask(0), mask(frames - 1), mask()], shape * 3, cpu)
    assert [tuple(c.shape) for c in built] == [(4, frames, 8, 8)] * 3


def test_generation_reads_the_given_frames_clip_tokens_in_both_halves_of_guidance(
        tiny_dataset, tiny_t5, tiny_wan_vae, clip_dir, tmp_path):
    from data.buckets import BucketShape
    from models.autoencoder import build_autoencoder
    from models.dit import text_conditioner
    from train.generate import generate, given_latents

    cfg = load_config([*i2v_run(tiny_dataset, tmp_path / "wan", clip_dir, tiny_t5, tiny_wan_vae, tmp_path / "run"),
                       "model.init_from=null"], check=False).model
    torch.manual_seed(0)
    model, autoencoder, text = TextToVideoModel(cfg).eval(), build_autoencoder(cfg.autoencoder), text_conditioner(cfg)
    shape = BucketShape(frames=5, height=32, width=32)
    image = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    given = given_latents(autoencoder, shape, last=image)
    seen = []
    hook = model.dit.condition_embedder.image_embedder.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    sampling = dict(steps=1, cfg_scale=2.0, seed=0, reference_tokens=256, device=torch.device("cpu"))
    generate(model, autoencoder, text, ["a red square", "a blue circle"], [shape, shape], given=[given, None],
             **sampling)
    hook.remove()
    black, last = text.image_encoder.black(), text.image_encoder.encode([image])[0]
    assert seen and all(torch.allclose(s[0], last) and torch.equal(s[1], black) for s in seen)
    assert seen[0].shape[0] == 4 and torch.equal(seen[0][2:], seen[0][:2])  # the unconditional half: its images too
    with pytest.raises(ValueError, match="pixels"):
        generate(model, autoencoder, text, ["a red square"], [shape], given=[given[:2]], **sampling)


def test_the_image_branch_is_counted_in_flops_and_its_encoder_in_memory(clip_dir):
    from models.flops import flops_per_sample, parameter_groups
    from train.memory import estimate

    cfg = load_config(kino_overrides(clip_dir), check=False)
    model = TextToVideoModel(cfg.model)
    groups = parameter_groups(model)
    # Per image token: the embedder's two linears, and each block's added key and value projections.
    assert groups.per_image_token == 6 * (32 * 32 + 32 * 48 + 2 * 2 * 48 * 48)
    plain = TextToVideoModel(load_config([*kino_overrides(clip_dir), "model.image.path=null"], check=False).model)
    assert parameter_groups(plain).per_video_token == groups.per_video_token  # not counted per video token
    n, m = 96, 7
    assert flops_per_sample(model, n, m) - flops_per_sample(plain, n, m) == \
        groups.per_image_token * TOKENS + 12 * 2 * 48 * n * TOKENS
    clip_parameters = sum(p.numel() for p in transformers.CLIPVisionModel.from_pretrained(clip_dir).parameters())
    with_clip, without = (estimate(load_config(o, check=False), world_size=1)
                          for o in (kino_overrides(clip_dir), [*kino_overrides(clip_dir), "model.image.path=null"]))
    assert with_clip.encoders - without.encoders == 2 * clip_parameters  # bf16 on a GPU (model.image.dtype=auto)


def test_lora_on_the_image_branch_exports_merged_and_as_adapters_diffusers_loads(tmp_path, clip_dir):
    pytest.importorskip("peft")
    from safetensors.torch import save_file

    from models.lora import adapter_state, merged_state

    base = save_random_wan_i2v(tmp_path / "wan")
    targets = "model.lora.targets=[to_q,to_k,to_v,to_out.0,add_k_proj,add_v_proj]"
    cfg = load_config([*kino_overrides(clip_dir), "model.lora.rank=4", targets], check=False).model
    model = TextToVideoModel(cfg).eval()
    missing, unexpected = model.dit.load_state_dict(load_diffusers(tmp_path / "wan", cfg), strict=False)
    assert unexpected == [] and all(".lora_" in name for name in missing)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
        "dit.blocks.0.attn2.add_k_proj.lora_A.weight", "dit.blocks.1.attn2.add_v_proj.lora_B.weight"}
    with torch.no_grad():  # as if trained: B leaves zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn_like(p) * 0.05)
    inputs, t, captions, text = packed_inputs(seed=3)
    ours = kino_per_clip(model, inputs, t, text)
    state = model.dit.state_dict()
    save_diffusers(merged_state(state, 4, 4.0), cfg, 24, tmp_path / "merged")
    merged = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    save_file({f"transformer.{k}": v.contiguous() for k, v in adapter_state(state, 4, 4.0).items()},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    base.load_lora_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"), prefix="transformer")
    for loaded in (merged, base):
        for a, b in zip(ours, diffusers_per_clip(loaded, inputs, t, captions, text.images)):
            assert (a - b).abs().max() < 1e-5


# -- what the transformer reads: Kino's inputs against diffusers' WanImageToVideoPipeline's (Wan 2.1) ---------------
FRAMES = 9  # 5 latent frames (temporal factor 2): the first alone, then two chunks of the VAE's causal cache


def i2v_model_config(clip_dir, vae_dir, images=1, *extra):
    """kino_overrides with the tiny Wan VAE (diffusers' AutoencoderKLWan) as the frozen autoencoder."""
    return load_config([*kino_overrides(clip_dir, images), "model.autoencoder.name=diffusers",
                        f"model.autoencoder.path={vae_dir}", "model.autoencoder.spatial_factor=4", *extra],
                       check=False).model


def tiny_pipeline(wan, vae_dir, clip_dir, sigma):
    """diffusers' WanImageToVideoPipeline of the tiny parts (no text encoder: the caption's embeddings are given),
    its scheduler set to one step at `sigma` (the timestep compared), and what its transformer reads and returns at
    each call."""
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=diffusers.AutoencoderKLWan.from_pretrained(vae_dir),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0),
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        image_encoder=transformers.CLIPVisionModel.from_pretrained(clip_dir).eval(), transformer=wan)
    schedule = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps=None, device=None, **_: schedule(sigmas=[sigma], device=device)
    seen = []
    wan.register_forward_pre_hook(lambda m, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    wan.register_forward_hook(lambda m, args, kwargs, out: seen[-1].update(out=out[0]), with_kwargs=True)
    return pipe, seen


def run_pipeline(pipe, video, latents, embeddings, images, output_type="latent"):
    """The pipeline given the clip's first frame (and for FLF2V its last), as images, with these latents."""
    from PIL import Image

    last = Image.fromarray(video[-1].numpy()) if images == 2 else None
    with torch.no_grad():
        return pipe(image=Image.fromarray(video[0].numpy()), last_image=last, prompt_embeds=embeddings,
                    height=video.shape[1], width=video.shape[2], num_frames=len(video), num_inference_steps=1,
                    guidance_scale=1.0, latents=latents[None].clone(), output_type=output_type).frames


@pytest.mark.parametrize("images", [1, 2], ids=["i2v", "flf2v"])
def test_training_gives_the_transformer_what_diffusers_i2v_pipeline_gives_it(tmp_path, clip_dir, tiny_wan_vae,
                                                                           images):
    """One clip, noise and timestep: the inputs Kino's training builds (through the trainer's step functions) are
    the tensors diffusers' WanImageToVideoPipeline (its own prepare_latents, the tiny AutoencoderKLWan, CLIP and
    transformer) feeds its transformer: every frame noisy, the mask per pixel frame, the encoding of [image, grey...]
    (FLF2V: [first, grey..., last]); the CLIP tokens are the same, and so is the model's output. Golden: Kino's own
    layout (model.image.inputs=kino) is not what the pipeline gives."""
    from types import SimpleNamespace

    from models.autoencoder import build_autoencoder
    from models.conditioning import conditioning_inputs, given_frames
    from models.flow import noisy_pair
    from models.image_encoder import ImageEncoder, clip_picks
    from train.sequence_parallel import SequenceLayout
    from train.trainer import Trainer

    wan = save_random_wan_i2v(tmp_path / "wan", images)
    model = kino_i2v(tmp_path / "wan", clip_dir, images)
    cfg = i2v_model_config(clip_dir, tiny_wan_vae, images)
    assert cfg.image.inputs == "pipeline"  # the default of a model with the image branch
    autoencoder = build_autoencoder(cfg.autoencoder)
    generator = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (FRAMES, 32, 32, 3), dtype=torch.uint8, generator=generator)
    x0 = autoencoder.encode(video)
    sigma = 0.7
    noisy, _ = noisy_pair(x0, torch.randn(x0.shape, generator=generator), sigma)
    mode = "first_frame" if images == 1 else "first_last"
    given = [given_frames(mode, x0.shape[1], generator)]
    trainer = SimpleNamespace(cfg=SimpleNamespace(model=cfg), layout=SequenceLayout(1, 0, 1), autoencoder=autoencoder,
                              env=SimpleNamespace(device=torch.device("cpu")))
    clips = SimpleNamespace(clips=[SimpleNamespace(video=video, encoded=False, condition=None)])
    conditions = Trainer.frame_conditions(trainer, clips, given, [x0])
    inputs, counted, counts = conditioning_inputs(cfg, {mode: 1.0}, [x0], [noisy], generator, model.dit.grid,
                                                  given=given, conditions=conditions)
    assert counted is None and counts is None  # the loss counts every frame: the model produces the given ones
    tokens = ImageEncoder(cfg.image).tokens(clip_picks(given, images, [video]))

    pipe, seen = tiny_pipeline(wan, tiny_wan_vae, clip_dir, sigma)
    embeddings = torch.randn(1, TEXT_TOKENS, 24, generator=generator)
    run_pipeline(pipe, video, noisy, embeddings, images)
    theirs = seen[0]["hidden_states"][0]
    assert float(seen[0]["timestep"]) == pytest.approx(sigma * 1000)
    assert inputs[0].shape == theirs.shape == (10, 5, 8, 8)
    assert (inputs[0] - theirs).abs().max() < 1e-5
    assert (tokens[0] - seen[0]["encoder_hidden_states_image"].flatten(0, 1)).abs().max() < 1e-5
    lengths = [TEXT_TOKENS]
    text = TextBatch(None, None, cu_seqlens_from_lengths(lengths, None), TEXT_TOKENS, lengths,
                     embeddings=embeddings[0], images=tokens)
    ours = kino_per_clip(model, inputs, torch.tensor([sigma]), text)[0]
    assert seen[0]["out"][0].abs().max() > 0.1 and (ours - seen[0]["out"][0]).abs().max() < 1e-5
    # The grey frames after the image encode to latents of their own (the VAE is causal, with a cache across its
    # chunks): not the grey clip's alone, so each clip's condition is one more encoding.
    assert (theirs[6:, 1:4] - autoencoder.blank(x0.shape)[:, 1:4]).abs().max() > 1e-3

    # Golden: Kino's own layout, as the model read it before, for the same clip, noise and timestep.
    old = i2v_model_config(clip_dir, tiny_wan_vae, images, "model.image.inputs=kino")
    kino, counted, _ = conditioning_inputs(old, {mode: 1.0}, [x0], [noisy], generator, model.dit.grid, given=given)
    kino = kino[0]
    assert counted is not None and counted.sum() < counted.numel()  # the given frames out of the loss
    assert (kino - theirs).abs().max() > 0.1
    assert (kino[:4, 0] - theirs[:4, 0]).abs().max() > 0.1  # the given frame clean, not noisy
    assert kino[6:, 1].eq(0).all() and theirs[6:, 1].abs().max() > 0.1  # zeros, not the grey frames' encoding
    if images == 2:  # FLF2V's last image is the last pixel frame alone: [0, 1], not [1, 1]
        assert kino[4:6, -1].flatten(1).amax(1).tolist() == [1.0, 1.0]
        assert theirs[4:6, -1].flatten(1).amax(1).tolist() == [0.0, 1.0]
    assert (kino_per_clip(model, [kino], torch.tensor([sigma]), text)[0] - seen[0]["out"][0]).abs().max() > 1e-2


@pytest.mark.parametrize("images", [1, 2], ids=["i2v", "flf2v"])
def test_generation_is_diffusers_i2v_pipelines_for_the_same_images_noise_and_caption(
        tmp_path, clip_dir, tiny_wan_vae, tiny_t5, images):
    """train.generate's path (given_latents, generate) with a first image (FLF2V: and a last) against the pipeline
    run with the same images, noise and caption embeddings, one Euler step from t = 1: the transformer reads the
    same input and the decoded clips are the same (the given frames the sampled ones, as the pipeline's)."""
    from data.buckets import BucketShape
    from models.autoencoder import build_autoencoder
    from models.dit import text_conditioner
    from train.generate import generate, given_latents

    wan = save_random_wan_i2v(tmp_path / "wan", images)
    cfg = i2v_model_config(clip_dir, tiny_wan_vae, images, "model.text.name=pretrained", f"model.text.path={tiny_t5}",
                           "model.text.max_tokens=16", f"model.text.pad_to={TEXT_TOKENS}")
    model = TextToVideoModel(cfg).eval()
    model.dit.load_state_dict(load_diffusers(tmp_path / "wan", cfg))
    autoencoder, text = build_autoencoder(cfg.autoencoder), text_conditioner(cfg)
    shape = BucketShape(frames=FRAMES, height=32, width=32)
    video = torch.randint(0, 256, (FRAMES, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    given = given_latents(autoencoder, shape, first=video[0], last=video[-1] if images == 2 else None)
    read = []
    hook = model.register_forward_pre_hook(lambda m, args: read.append(args[0][0]))
    ours, = generate(model, autoencoder, text, ["a red circle"], [shape], steps=1, cfg_scale=1.0, seed=3,
                     reference_tokens=256, device=torch.device("cpu"), given=[given])
    hook.remove()
    noise = torch.randn((4, 5, 8, 8), generator=torch.Generator().manual_seed(3))  # generate's, for its seed
    pipe, seen = tiny_pipeline(wan, tiny_wan_vae, clip_dir, sigma=1.0)
    frames = run_pipeline(pipe, video, noise, text.batch(["a red circle"]).embeddings[None], images, output_type="np")
    assert len(read) == len(seen) == 1 and (read[0] - seen[0]["hidden_states"][0]).abs().max() < 1e-5
    theirs = torch.from_numpy(frames[0]) * 255
    assert ours.shape == theirs.shape == (FRAMES, 32, 32, 3)
    assert (ours.float() - theirs).abs().max() <= 1.0  # Kino rounds to uint8


def test_a_wan_i2v_run_at_sp2_trains_the_losses_of_one_rank(tiny_dataset, tiny_t5, tiny_wan_vae, clip_dir, tmp_path):
    """model.image.inputs=pipeline under sequence parallelism, every mode from the videos: the group's leader, which
    alone holds the pixels, encodes each clip's condition latents (and CLIP's tokens) and sends them to the other
    rank; two ranks at SP=2 train the losses of one rank."""
    from tests.integration.test_sequence_parallel import _losses
    from tests.integration.test_wan import torchrun_train

    save_random_wan_i2v(tmp_path / "wan")
    every = [f"++curriculum.stages.{i}.conditioning.{mode}={share}" for i in (0, 1) for mode, share in (
        ("text", 0.2), ("first_frame", 0.2), ("last_frame", 0.15), ("first_last", 0.15), ("extend", 0.15),
        ("extend_backward", 0.15))]
    runs = {}
    for name, nproc, extra in (("one", 1, []), ("two", 2, ["parallel.sequence=2"])):
        runs[name] = tmp_path / name
        result = torchrun_train([*i2v_run(tiny_dataset, tmp_path / "wan", clip_dir, tiny_t5, tiny_wan_vae,
                                          runs[name], *every, *extra, steps=(3, 2))], nproc=nproc)
    assert "1 sequence-parallel group(s) of 2" in result.stdout
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=1e-5)


def test_the_validation_loss_gives_a_clip_the_grey_clips_condition_under_the_pipelines_inputs(
        tmp_path, clip_dir, tiny_wan_vae):
    """tracking.eval_clips under model.image.inputs=pipeline: a held-out clip is scored as the model reads a clip
    given no frame, the grey clip's latents in its condition channels (it raised before: no condition)."""
    from types import SimpleNamespace

    from models.autoencoder import build_autoencoder
    from models.conditioning import text_only_input
    from models.dit import TextToVideoModel, text_conditioner
    from models.flow import noisy_pair
    from train.evaluate import VALIDATION_TIMESTEPS, validation_loss

    cfg = i2v_model_config(clip_dir, tiny_wan_vae)
    assert cfg.pipeline_inputs
    torch.manual_seed(0)
    model, autoencoder, text = TextToVideoModel(cfg).eval(), build_autoencoder(cfg.autoencoder), text_conditioner(cfg)
    video = torch.randint(0, 256, (FRAMES, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    clip = SimpleNamespace(video=video, caption="a red circle moving right on a black background")
    scored = validation_loss(model, autoencoder, text, [clip], torch.device("cpu"))["overall"]

    x0 = autoencoder.encode(video)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    grey = autoencoder.blank(tuple(x0.shape))
    losses = []
    with torch.no_grad():
        for t in VALIDATION_TIMESTEPS:
            x_t, target = noisy_pair(x0, noise, t)
            out = model([text_only_input(cfg, x_t, grey)], torch.tensor([t]), text.batch([clip.caption], "cpu"))
            losses.append(float((out - model.dit.patchify([target])).pow(2).mean()))
    assert scored == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    with pytest.raises(ValueError, match="grey clip's latents"):  # golden: without it there is no input to score
        text_only_input(cfg, x0)
