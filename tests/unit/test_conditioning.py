"""Conditioning frames (models/conditioning.py): which frames each mode gives, what the model reads, which tokens
the loss counts, the stage mix and its checks, and generation around given frames."""
import pytest
import torch

from conf.errors import ConfigError
from conf.schema import load_config
from models.conditioning import (MODES, check_shares, conditioned_input, draw_modes, given_frames, input_channels,
                                 token_weights)
from models.dit import patchify


def test_each_mode_gives_its_frames_and_always_leaves_some_to_generate():
    g = torch.Generator().manual_seed(0)
    assert given_frames("text", 5, g).tolist() == [False] * 5
    assert given_frames("first_frame", 5, g).tolist() == [True, False, False, False, False]
    assert given_frames("last_frame", 5, g).tolist() == [False, False, False, False, True]
    assert given_frames("first_last", 5, g).tolist() == [True, False, False, False, True]
    stretches = set()
    for _ in range(200):
        forward, backward = given_frames("extend", 5, g), given_frames("extend_backward", 5, g)
        n = int(forward.sum())
        assert forward.tolist() == [True] * n + [False] * (5 - n) and 1 <= n <= 4
        m = int(backward.sum())
        assert backward.tolist() == [False] * (5 - m) + [True] * m and 1 <= m <= 4
        stretches.add(n)
    assert stretches == {1, 2, 3, 4}
    assert not given_frames("first_frame", 1, g).any()  # an image has nothing to generate around
    with pytest.raises(ValueError, match="one of"):
        given_frames("middle", 5, g)


def test_modes_are_drawn_by_their_shares_reproducibly():
    shares = {"text": 0.5, "first_frame": 0.25, "extend": 0.25}
    modes = draw_modes(shares, 4000, torch.Generator().manual_seed(1))
    assert modes == draw_modes(shares, 4000, torch.Generator().manual_seed(1))
    counts = {m: modes.count(m) / 4000 for m in MODES}
    assert counts["text"] == pytest.approx(0.5, abs=0.03) and counts["first_frame"] == pytest.approx(0.25, abs=0.03)
    assert counts["last_frame"] == counts["first_last"] == 0


def test_the_model_reads_the_given_frames_clean_beside_a_mask_and_their_latents():
    clean, noisy = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    given = torch.tensor([True, False, False, True])
    x = conditioned_input(noisy, clean, given, mask_channels=2)
    assert x.shape == (input_channels(3, True, 2), 4, 2, 2) == (8, 4, 2, 2)
    assert torch.equal(x[:3, 0], clean[:, 0]) and torch.equal(x[:3, 1], noisy[:, 1])  # given frames clean
    assert x[3:5, 0].eq(1).all() and x[3:5, 1].eq(0).all()  # the mask, one channel per pixel frame
    assert torch.equal(x[5:, 3], clean[:, 3]) and x[5:, 1:3].eq(0).all()  # the given latents, zero elsewhere
    assert input_channels(3, False, 2) == 3


def test_the_loss_counts_the_generated_frames_tokens_only_in_the_packed_layout():
    """A token's weight follows its latent frame, packed as `patchify` packs the clips."""
    clips = [torch.arange(3).view(1, 3, 1, 1).expand(1, 3, 4, 4).float(), torch.full((1, 2, 2, 4), 7.0)]
    given = [torch.tensor([True, False, True]), torch.tensor([False, False])]
    weights = token_weights(given, [(3, 2, 2), (2, 1, 2)])
    tokens = patchify(clips, (1, 2, 2))
    frame_of_token = tokens[:, 0]  # clip 0's value is its frame index; clip 1's tokens are all 7
    assert weights.tolist() == [0.0 if f in (0, 2) else 1.0 for f in frame_of_token[:12].tolist()] + [1.0] * 4


def test_a_stage_mix_is_checked_before_any_process_starts():
    base = ["experiment=demo", "curriculum=demo", "model.frame_conditioning=true"]  # text only, then each mix
    cfg = load_config(base + ["+curriculum.stages.0.conditioning.first_frame=0.25",
                              "curriculum.stages.0.conditioning.text=0.75"])
    assert dict(cfg.curriculum.stages[0].conditioning) == {"text": 0.75, "first_frame": 0.25}
    assert dict(load_config(base).curriculum.stages[1].conditioning) == {"text": 1.0}
    demo = load_config(["experiment=demo_modes"])  # `make demo` trains the mix in both stages
    assert demo.model.frame_conditioning and all(
        dict(stage.conditioning) == {"text": 0.6, "first_frame": 0.2, "first_last": 0.1, "extend": 0.1}
        for stage in demo.curriculum.stages)
    with pytest.raises(ConfigError, match="sum to 1.25"):
        load_config(base + ["+curriculum.stages.0.conditioning.first_frame=0.25"])
    with pytest.raises(ConfigError, match="unknown mode"):
        load_config(base + ["+curriculum.stages.0.conditioning.middle=0.5", "curriculum.stages.0.conditioning.text=0.5"])
    with pytest.raises(ConfigError, match="set model.frame_conditioning=true"):
        load_config(["experiment=demo", "curriculum=demo", "model.frame_conditioning=false",
                     "+curriculum.stages.0.conditioning.extend=0.5",
                     "curriculum.stages.0.conditioning.text=0.5"])
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(base + ["model.patch_size=[2,4,4]", "curriculum.stages.0.frame_counts=[8]",
                            "curriculum.stages.1.frame_counts=[8]"])
    with pytest.raises(ValueError, match=">= 0"):
        check_shares({"text": 1.5, "extend": -0.5}, "k")


def test_generation_keeps_the_given_frames_and_the_model_reads_them():
    """Through `generate`, a first frame given to a frame-conditioned model: the clip starts with it exactly (the
    pixel autoencoder: latents are pixels), and the model was called with the mask and the given latents."""
    from data.buckets import BucketShape
    from models.autoencoder import build_autoencoder
    from models.dit import TextToVideoModel, text_conditioner
    from train.generate import generate, given_latents

    cfg = load_config(["experiment=demo", "model.frame_conditioning=true"])
    torch.manual_seed(0)
    model = TextToVideoModel(cfg.model)
    autoencoder = build_autoencoder(cfg.model.autoencoder)
    text = text_conditioner(cfg.model)
    shape = BucketShape(frames=8, height=24, width=24)
    image = torch.zeros(24, 24, 3, dtype=torch.uint8)
    image[4:12, 2:10, 0] = 255  # a red square, top left
    latents, given, pixels = given_latents(autoencoder, shape, first=image)
    assert given.tolist() == [True] + [False] * 7 and torch.equal(pixels[0], image) and not pixels[1:].any()
    seen = []
    hook = model.dit.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    videos = generate(model, autoencoder, text, ["a red square"], [shape], steps=2, cfg_scale=1.0, seed=0,
                      reference_tokens=256, device=torch.device("cpu"), given=[(latents, given)])
    hook.remove()
    assert torch.equal(videos[0][0], image)
    assert seen and seen[0] == model.dit.input_patch_dim == 7 * 16  # 3 + 1 + 3 channels, 4 x 4 patches


def test_extending_grows_a_clip_in_windows_each_given_the_end_of_the_last():
    """An 8-frame clip extended to 20 frames in windows of 8 (4 latent frames given, 4 generated each): the clip
    comes back first, unchanged, and the length is the one asked for. Every window is called with its first half
    given (the model reads the mask)."""
    from data.buckets import BucketShape
    from models.autoencoder import build_autoencoder
    from models.dit import TextToVideoModel, text_conditioner
    from train.generate import extend

    cfg = load_config(["experiment=demo", "model.frame_conditioning=true"])
    torch.manual_seed(0)
    model = TextToVideoModel(cfg.model)
    autoencoder = build_autoencoder(cfg.model.autoencoder)
    shape = BucketShape(frames=8, height=24, width=24)
    video = torch.randint(0, 256, (8, 24, 24, 3), dtype=torch.uint8)
    masks, noise = [], []
    mask_channel = cfg.model.autoencoder.latent_channels * 16  # the first mask value of each token's patch vector

    def record(module, args, out):
        masks.append(args[0][:, mask_channel])
        noise.append(args[0].view(8, 36, -1)[4:, :, :mask_channel])  # the generated frames' noisy latents

    hook = model.dit.patch_embed.register_forward_hook(record)
    out, = extend(model, autoencoder, text_conditioner(cfg.model), ["a red circle moving right"], [video], [shape],
                  20, steps=1, cfg_scale=1.0, seed=0, reference_tokens=256, device=torch.device("cpu"))
    hook.remove()
    assert out.shape == (20, 24, 24, 3) and torch.equal(out[:8], video)
    assert len(masks) == 3  # 8 -> 12 -> 16 -> 20
    for mask in masks:  # 8 latent frames of 6 x 6 tokens: the first 4 frames given
        assert mask.view(8, 36).eq(1).all(dim=1).tolist() == [True] * 4 + [False] * 4
    assert not torch.equal(noise[1], noise[2])  # each window its own noise (one step: the input is the noise)


def test_a_micro_batchs_inputs_and_loss_weights_follow_the_drawn_modes():
    """With a mix, the given frames' tokens weigh 0 in the loss and the rest 1; a text-only stage draws nothing
    from the trainer's generator (a text-to-video run's random stream is what it was before conditioning frames
    existed), and a model without them gets its noisy latents untouched."""
    from models.conditioning import conditioning_inputs

    cfg = load_config(["experiment=demo", "model.frame_conditioning=true"]).model
    clean = [torch.randn(3, 4, 8, 8), torch.randn(3, 2, 8, 4)]
    noisy = [torch.randn_like(c) for c in clean]
    grid = lambda shape: (shape[1], shape[2] // 4, shape[3] // 4)  # noqa: E731 (the demo's 1 x 4 x 4 patches)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    inputs, counted, counts = conditioning_inputs(cfg, {"text": 1.0}, clean, noisy, g, grid)
    assert counted is None and counts is None and torch.equal(g.get_state(), state)
    assert [x.shape[0] for x in inputs] == [7, 7] and all(x[3].eq(0).all() for x in inputs)
    inputs, counted, counts = conditioning_inputs(cfg, {"first_frame": 1.0}, clean, noisy, g, grid)
    assert counted.tolist() == [0.0] * 4 + [1.0] * 12 + [0.0] * 2 + [1.0] * 2 and counts == [12, 2]
    assert torch.equal(inputs[0][:3, 0], clean[0][:, 0]) and torch.equal(inputs[0][:3, 1:], noisy[0][:, 1:])
    plain = load_config(["experiment=demo", "model.frame_conditioning=false", "curriculum=demo"]).model
    inputs, counted, counts = conditioning_inputs(plain, {"text": 1.0}, clean, noisy, g, grid)
    assert counted is None and counts is None and all(a is b for a, b in zip(inputs, noisy))


def test_the_loss_does_not_reach_the_given_frames_and_is_the_mean_over_the_generated_ones():
    """Through the trainer's micro-batch step with every clip given its first frame: the gradient of the loss
    reaches no output token of a given frame and every generated one, and the loss the metrics report is the mean
    squared error over the generated tokens alone (a loss over every token would send gradient to the given
    frames: the first assertion)."""
    from tests.unit.test_host_syncs import bare_trainer, micro_batch
    from train.trainer import Trainer

    cfg = load_config(["experiment=demo", "curriculum=demo", "model.attention_backend=sdpa", "model.frame_conditioning=true",
                       "curriculum.stages.0.conditioning.text=0.0", "+curriculum.stages.0.conditioning.first_frame=1.0"])
    trainer = bare_trainer(cfg)
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    trainer.model.dit.final.register_forward_hook(keep)
    result = Trainer.forward_backward_step(trainer, micro_batch(count=2))  # 8 frames of 4 x 4 tokens each
    grad = outputs[0].grad.abs().sum(dim=-1).view(2, 8, 16)
    assert grad[:, 0].eq(0).all() and grad[:, 1:].gt(0).all()
    assert float(result.loss_tokens) == 2 * 7 * 16
    per_clip = result.per_sample_loss
    assert float(result.loss_sum) / float(result.loss_tokens) == pytest.approx(float(per_clip.mean()), rel=1e-5)


def test_clips_given_frames_train_at_their_own_timestep_mean_and_text_clips_keep_theirs():
    from models.conditioning import conditioned_timesteps
    from models.flow import sample_timesteps

    t = sample_timesteps(2000, torch.Generator().manual_seed(0), mean=0.8)
    given = [torch.tensor([i % 2 == 1, False, False]) for i in range(2000)]  # every other clip given its first frame
    moved = conditioned_timesteps(t, given, 0.8, 1.0, conditioned_mean=2.0)
    assert torch.equal(moved[0::2], t[0::2])  # text clips: the same draws
    assert torch.allclose(torch.logit(moved[1::2]) - torch.logit(t[1::2]), torch.full((1000,), 1.2), atol=1e-4)
    assert (moved[1::2] > 0.95).float().mean() > 5 * (t[1::2] > 0.95).float().mean()
    wider = conditioned_timesteps(t, given, 0.8, 1.0, conditioned_std=2.0)  # both tails, the same median
    assert torch.equal(wider[0::2], t[0::2])
    assert torch.allclose(torch.logit(wider[1::2]) - 0.8, 2.0 * (torch.logit(t[1::2]) - 0.8), atol=1e-3)
    assert conditioned_timesteps(t, given, 0.8, 1.0) is t and conditioned_timesteps(t, None, 0.8, 1.0, 2.0) is t


def test_the_trainer_draws_the_timesteps_of_clips_given_frames_around_train_conditioned_timestep_mean():
    from tests.unit.test_host_syncs import bare_trainer, micro_batch
    from train.trainer import Trainer

    base = ["experiment=demo", "model.attention_backend=sdpa", "curriculum=demo", "model.frame_conditioning=true"]
    every_clip_given = ["curriculum.stages.0.conditioning.text=0.0", "+curriculum.stages.0.conditioning.first_frame=1.0"]

    def timesteps(overrides):
        return Trainer.forward_backward_step(bare_trainer(load_config(base + overrides)), micro_batch(6)).timesteps

    plain, raised = timesteps(every_clip_given), timesteps(every_clip_given + ["train.conditioned_timestep_mean=3.0"])
    assert (raised > plain).all()  # the same draws, each moved up
    # A text-only stage draws as it did: the knob touches nothing else.
    assert torch.equal(timesteps([]), timesteps(["train.conditioned_timestep_mean=3.0"]))
    assert (timesteps(every_clip_given + ["train.conditioned_timestep_std=2.0"]) != plain).all()
    with pytest.raises(ConfigError, match="set model.frame_conditioning=true"):
        load_config(["experiment=demo", "model.frame_conditioning=false", "train.conditioned_timestep_mean=2.0"])
    with pytest.raises(ConfigError, match="conditioned_timestep_std=0.0: must be > 0"):
        load_config(base + ["train.conditioned_timestep_std=0.0"])
