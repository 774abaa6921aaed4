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


def test_image_conditioning_configs_that_cannot_run_are_refused(clip_dir):
    base = [*kino_overrides(clip_dir), "model.autoencoder.temporal_factor=1",  # the demo curriculum's 8 frames
            "curriculum.stages.0.token_budget=8192", "curriculum.stages.1.token_budget=8192"]
    assert load_config(base).model.image.path == str(clip_dir)
    for overrides, match in ((["model.arch=kino"], "model.image.path: the CLIP image branch is Wan 2.1 I2V's"),
                             (["model.frame_conditioning=false"], "set model.frame_conditioning=true"),
                             (["model.image.images=3"], "model.image.images=3: 1"),
                             (["model.image.dtype=fp16"], "model.image.dtype='fp16'"),
                             (["model.image.tokens=0"], "must be positive")):
        with pytest.raises(ConfigError, match=match):
            load_config([*base, *overrides])
    # Wan with conditioning frames and no image branch: a 2 x latent + mask channel input, no CLIP.
    plain = load_config([o for o in base if not o.startswith("model.image.path")]).model
    assert plain.frame_conditioning and plain.image.path is None
