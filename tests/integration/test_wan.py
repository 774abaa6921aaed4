"""model.arch=wan against diffusers' WanTransformer3DModel: tiny random configs saved to a temp dir (no hub).
Kino's packed forward equals diffusers' per clip on the same weights; directories load with a key-by-key check;
export writes what diffusers loads; LoRA adapters export in diffusers' format and reproduce Kino's output."""
import json

import pytest
import torch

from conf.schema import ConfigError, load_config
from train.preflight import check_data
from models.dit import TextToVideoModel
from models.layers import cu_seqlens_from_lengths
from models.text_encoder import TextBatch
from models.wan_weights import WeightsMismatch, check_matches, load_diffusers, save_diffusers
from models.weights import weights_sha256

diffusers = pytest.importorskip("diffusers")

# Wan's layout at toy size: 4 heads of 12, 2 blocks, an FFN width that is no round ratio, 4 latent channels.
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=24, freq_dim=256, ffn_dim=80, num_layers=2)
KINO = ["model.arch=wan", "model.dim=48", "model.heads=4", "model.depth=2", "model.ffn_dim=80",
        "model.patch_size=[1,2,2]", "model.autoencoder.latent_channels=4", "model.text.dim=24",
        "model.text.heads=2", "model.text.depth=1", "model.attention_backend=reference"]
SHAPES = [(4, 3, 8, 12), (4, 1, 6, 6), (4, 5, 4, 4)]  # (C, T, H, W): three grids, one a single frame


def save_random_wan(path, seed=0):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**WAN)
    with torch.no_grad():  # off the zero output projection, so every output is compared
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model.eval()


def packed_inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(shape, generator=generator) for shape in SHAPES]
    captions = [torch.randn(n, 24, generator=generator) for n in (5, 3, 7)]
    t = torch.tensor([0.3, 0.7, 0.95])
    text = TextBatch(None, None, cu_seqlens_from_lengths([5, 3, 7], None), 7, [5, 3, 7],
                     embeddings=torch.cat(captions))
    return latents, t, captions, text


def kino_wan(directory, *overrides):
    cfg = load_config([*KINO, *overrides], check=False).model
    model = TextToVideoModel(cfg).eval()
    missing, unexpected = model.dit.load_state_dict(load_diffusers(directory, cfg), strict=False)
    assert unexpected == [] and all(".lora_" in name for name in missing)
    return model


def diffusers_per_clip(wan, latents, t, captions):
    with torch.no_grad():
        return [wan(hidden_states=x[None], timestep=ti[None] * 1000, encoder_hidden_states=c[None],
                    return_dict=False)[0][0] for x, ti, c in zip(latents, t, captions)]


def kino_per_clip(model, latents, t, text):
    with torch.no_grad():
        return model.dit.unpatchify(model.dit(latents, t, text.embeddings, text), [x.shape for x in latents])


def test_kino_wan_equals_diffusers_wan_for_each_clip_of_a_packed_batch(tmp_path):
    wan = save_random_wan(tmp_path / "wan")
    model = kino_wan(tmp_path / "wan")
    latents, t, captions, text = packed_inputs()
    for ours, theirs in zip(kino_per_clip(model, latents, t, text), diffusers_per_clip(wan, latents, t, captions)):
        assert theirs.abs().max() > 0.1
        assert (ours - theirs).abs().max() < 1e-5


def test_a_directory_that_does_not_match_the_config_is_named_key_by_key(tmp_path):
    save_random_wan(tmp_path / "wan")
    cfg = load_config([*KINO, "model.ffn_dim=96", "model.depth=3"], check=False).model
    with pytest.raises(WeightsMismatch) as error:
        check_matches(tmp_path / "wan", cfg, 24)
    message = str(error.value)
    assert "ffn_dim: the directory has 80, the config gives 96" in message
    assert "missing tensor blocks.2.attn1.to_q.weight" in message
    assert "blocks.0.ffn.net.0.proj.weight: shape [80, 48] in the directory, [96, 48] in the model" in message


def test_init_from_is_checked_before_any_process_starts(tmp_path, tiny_dataset):
    save_random_wan(tmp_path / "wan")
    budgets = ["curriculum.stages.0.token_budget=8192", "curriculum.stages.1.token_budget=8192",
               f"data.root={tiny_dataset}"]  # check_data reads every dataset the run names
    good = [*KINO, *budgets, f"model.init_from={tmp_path / 'wan'}", "model.init_license=Apache-2.0"]
    assert load_config(good).model.init_from
    check_data(load_config(good))
    with pytest.raises(ConfigError, match="model.init_license"):
        load_config([*KINO, *budgets, f"model.init_from={tmp_path / 'wan'}"])
    with pytest.raises(ConfigError, match="not in data.licenses.allow_weights"):
        load_config([*good[:-1], "model.init_license=CC-BY-NC-4.0"])
    with pytest.raises(ConfigError, match="model.depth|num_layers"):
        check_data(load_config([*good, "model.depth=3"]))
    # The files are the nodes': `launch slurm|k8s` renders a job whose weights it cannot see (validate reads no
    # file), while python -m train and launch local check them before any process group starts.
    elsewhere = [*good[:-2], f"model.init_from={tmp_path / 'on-the-nodes'}", good[-1]]
    assert load_config(elsewhere).model.init_from
    with pytest.raises(ConfigError, match="is not a directory"):
        check_data(load_config(elsewhere))


def test_export_writes_what_diffusers_loads_and_it_matches_kino(tmp_path):
    save_random_wan(tmp_path / "wan")
    model = kino_wan(tmp_path / "wan")
    with torch.no_grad():  # as if trained: every weight moved
        for p in model.dit.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_diffusers(model.dit.state_dict(), model.cfg, 24, tmp_path / "out")
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    latents, t, captions, text = packed_inputs(seed=2)
    for ours, theirs in zip(kino_per_clip(model, latents, t, text), diffusers_per_clip(loaded, latents, t, captions)):
        assert (ours - theirs).abs().max() < 1e-5
    assert weights_sha256(tmp_path / "out") != weights_sha256(tmp_path / "wan")


def test_lora_trains_only_adapters_and_its_export_loads_into_diffusers(tmp_path):
    pytest.importorskip("peft")
    from models.lora import adapter_state, merged_state
    from safetensors.torch import save_file

    base = save_random_wan(tmp_path / "wan")
    model = kino_wan(tmp_path / "wan", "model.lora.rank=4", "model.lora.alpha=8")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 10 * 2  # A and B x (4 + 4 attention projections + 2 FFN layers) x 2 blocks
    with torch.no_grad():  # as if trained: B leaves zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn_like(p) * 0.05)
    latents, t, captions, text = packed_inputs(seed=3)
    ours = kino_per_clip(model, latents, t, text)
    base_out = diffusers_per_clip(base, latents, t, captions)
    assert max((a - b).abs().max() for a, b in zip(ours, base_out)) > 1e-3  # the adapters change the output
    state = model.dit.state_dict()
    save_file({f"transformer.{k}": v.contiguous() for k, v in adapter_state(state, 4, 8.0).items()},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    base.load_lora_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"), prefix="transformer")
    for a, b in zip(ours, diffusers_per_clip(base, latents, t, captions)):
        assert (a - b).abs().max() < 1e-5
    save_diffusers(merged_state(state, 4, 8.0), model.cfg, 24, tmp_path / "merged")
    merged = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    for a, b in zip(ours, diffusers_per_clip(merged, latents, t, captions)):
        assert (a - b).abs().max() < 1e-5
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["ffn_dim"] == 80


# -- end to end: python -m train from Wan weights, with the frozen Wan VAE and T5, then export -----------------
def run_overrides(dataset, wan_dir, text_dir, vae_dir, run_dir, *extra, steps=(14, 6)):
    stage = ["resolutions=[32]", "aspect_ratios=[1.0]", "frame_counts=[5]", "token_budget=192", "warmup_steps=0"]
    return ["experiment=wan_finetune", f"data.root={dataset}", f"train.run_dir={run_dir}", "data.fps=8",
            f"model.init_from={wan_dir}", f"model.text.path={text_dir}", "model.text.tokenizer_path=null",
            "model.text.max_tokens=16", "model.text.pad_to=16", f"model.autoencoder.path={vae_dir}",
            "model.autoencoder.latent_channels=4", "model.autoencoder.temporal_factor=2",
            "model.autoencoder.spatial_factor=4", "model.dim=48", "model.heads=4", "model.depth=2",
            "model.ffn_dim=80", "model.activation_checkpointing=false", "curriculum=demo",
            *[f"curriculum.stages.{i}.{s}" for i in (0, 1) for s in stage],
            f"curriculum.stages.0.steps={steps[0]}", f"curriculum.stages.1.steps={steps[1]}", "zero.stage=2", "zero.precision=fp32", "tracking.mode=disabled",
            "tracking.eval_prompts=0", "tracking.eval_clips=0", "tracking.sampling_steps=2", "tracking.log_every=1",
            "train.checkpoint_every=10", "train.shift_reference_tokens=256", *extra]


def torchrun_train(overrides, nproc=2):
    import os
    import sys

    from tests.conftest import REPO, shared_ray_address
    from tests.forked_ranks import run_ranks

    ray = [f"data.ray_address={shared_ray_address()}"] if nproc > 1 else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train", *overrides, *ray]
    result = run_ranks(command, cwd=REPO, env=dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1"),
                       timeout=900)  # forked ranks: tests/forked_ranks.py
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def ema_dit(run_dir, step):
    from train.export import ema_weights

    weights = ema_weights(run_dir / "checkpoints" / f"step_{step}")
    return {k[len("dit."):]: v for k, v in weights.items() if k.startswith("dit.")}


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_base") / "transformer"
    save_random_wan(path)
    return path


def test_a_wan_finetune_from_base_weights_exports_to_diffusers_and_records_its_origin(
        tiny_dataset, tiny_t5, tiny_wan_vae, wan_dir, tmp_path):
    from train.export import main as export_main

    run_dir = tmp_path / "run"
    result = torchrun_train(run_overrides(tiny_dataset, wan_dir, tiny_t5, tiny_wan_vae, run_dir))
    sha = weights_sha256(wan_dir)
    assert f"base model    : transformer (Apache-2.0, sha256 {sha})" in result.stdout
    checkpoint = run_dir / "checkpoints" / "step_20"
    audit = json.loads((checkpoint / "audit.json").read_text())
    assert audit["base_model"] == {"name": "transformer", "path": str(wan_dir.resolve()), "sha256": sha,
                                   "license": "Apache-2.0"}
    assert json.loads((checkpoint / "train_state.json").read_text())["base_model"]["sha256"] == sha
    assert f"init_sha256: {sha}" in (checkpoint / "config.yaml").read_text()
    # It trained from the base weights: the EMA moved off them, by a little.
    base = load_diffusers(wan_dir, load_config(KINO, check=False).model)
    trained = ema_dit(run_dir, 20)
    moved = max((trained[k] - base[k]).abs().max().item() for k in base)
    assert 1e-4 < moved < 1.0
    export_main([str(run_dir), "--format", "diffusers", "--out", str(tmp_path / "export")])
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "export").eval()
    cfg = load_config(KINO, check=False).model
    model = TextToVideoModel(cfg).eval()
    model.dit.load_state_dict(trained)
    latents, t, captions, text = packed_inputs(seed=4)
    for ours, theirs in zip(kino_per_clip(model, latents, t, text), diffusers_per_clip(loaded, latents, t, captions)):
        assert (ours - theirs).abs().max() < 1e-5


def test_a_lora_run_trains_only_adapters_under_zero3_resumes_exactly_and_exports_them(
        tiny_dataset, tiny_t5, tiny_wan_vae, wan_dir, tmp_path):
    pytest.importorskip("peft")
    from train.export import main as export_main

    lora = ("model.lora.rank=4", "model.lora.alpha=8", "zero.stage=3", "curriculum.stages.0.lr=1e-2",
            "curriculum.stages.1.lr=1e-2")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    short = dict(steps=(5, 3))
    result = torchrun_train(run_overrides(tiny_dataset, wan_dir, tiny_t5, tiny_wan_vae, straight, *lora, **short))
    assert "trainable (" in result.stdout and "LoRA rank 4" in result.stdout
    torchrun_train(run_overrides(tiny_dataset, wan_dir, tiny_t5, tiny_wan_vae, interrupted, *lora,
                                 "train.stop_after_steps=3", **short))
    torchrun_train(run_overrides(tiny_dataset, wan_dir, tiny_t5, tiny_wan_vae, interrupted, *lora, **short))
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, interrupted)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]  # across the stage change at step 5
    from tests.exactly_once import assert_exactly_once

    assert_exactly_once(interrupted)
    trained, base = ema_dit(straight, 8), load_diffusers(wan_dir, load_config(KINO, check=False).model)
    assert all(torch.equal(trained[k], base[k]) for k in base)  # the base weights never moved
    assert max(trained[k].abs().max().item() for k in trained if ".lora_B." in k) > 0  # the adapters did
    export_main([str(straight), "--format", "diffusers", "--lora", "adapters", "--out", str(tmp_path / "adapters")])
    pipeline_transformer = diffusers.WanTransformer3DModel.from_pretrained(wan_dir).eval()
    pipeline_transformer.load_lora_adapter(str(tmp_path / "adapters" / "pytorch_lora_weights.safetensors"),
                                           prefix="transformer")
    model = TextToVideoModel(load_config([*KINO, "model.lora.rank=4", "model.lora.alpha=8"], check=False).model)
    model.dit.load_state_dict(trained)
    latents, t, captions, text = packed_inputs(seed=5)
    for ours, theirs in zip(kino_per_clip(model.eval(), latents, t, text),
                            diffusers_per_clip(pipeline_transformer, latents, t, captions)):
        assert (ours - theirs).abs().max() < 1e-5
