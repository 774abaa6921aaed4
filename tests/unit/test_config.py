import pytest

from conf.schema import ConfigError, changed_trajectory_keys, from_yaml, load_config, to_yaml, trajectory_hash


def test_demo_experiment_composes_and_validates():
    cfg = load_config(["experiment=demo"])
    assert cfg.train.experiment == "demo"
    assert cfg.zero.stage == 2
    assert [s.name for s in cfg.curriculum.stages] == ["main", "anneal"]
    assert "CC0-1.0" in cfg.data.licenses.allow and "CC-BY-NC-4.0" not in cfg.data.licenses.allow
    assert cfg.run_dir == "runs/demo"


TEXT_ONLY = ["model.frame_conditioning=false", "curriculum=demo"]  # the demo without its conditioning frames


@pytest.mark.parametrize("override, key", [
    (["model.no_such_knob=1"], "model.no_such_knob"),
    (["zero.stage=4"], "zero.stage"),
    (["zero.precision=fp8"], "zero.precision"),
    (["model.attention_backend=magic"], "model.attention_backend"),
    (["curriculum.stages.0.token_budget=10"], "curriculum.stages[0].token_budget"),
    (["curriculum.stages.0.resolutions=[30]"], "curriculum.stages[0].resolutions"),
    (["model.patch_size=[3,4,4]", *TEXT_ONLY], "curriculum.stages[0].frame_counts"),
    (["model.heads=3"], "model.dim"),
    (["data.licenses.allow=[]"], "data.licenses.allow"),
    (["tracking.mode=sometimes"], "tracking.mode"),
    (["model=S", *TEXT_ONLY], "curriculum.stages[0].frame_counts"),
    (["zero.offload_parameters=true"], "zero.offload_parameters"),
    (["curriculum.stages.0.image_fraction=1.5"], "curriculum.stages[0].image_fraction"),  # 4 and 8 frames do not fit a 4x causal VAE
    (["model.conditioning=concat"], "model.conditioning"),
    (["model.text.name=pretrained"], "model.text.path"),
    (["data.lease_timeout_s=0"], "data.lease_timeout_s"),
    (["parallel.sequence=0"], "parallel.sequence"),
    (["parallel.sequence=3"], "parallel.sequence=3 does not divide model.heads=4"),
    (["parallel.sequence=4", "launcher.procs_per_node=2"], "does not divide the world size 2"),
    (["parallel.ring=0"], "parallel.ring"),
    (["parallel.sequence=4", "parallel.ring=3"], "parallel.sequence=4 is not a multiple of parallel.ring=3"),
    (["parallel.sequence=4", "parallel.ulysses=2", "parallel.ring=4"], "is not parallel.ulysses x parallel.ring"),
    (["parallel.ulysses=3", "parallel.ring=2"], "parallel.ulysses=3 does not divide model.heads=4"),
    (["model.conditioning=joint", "parallel.ring=2", "launcher.procs_per_node=2"], "model.conditioning=joint"),
    (["model.mlp_chunks=0"], "model.mlp_chunks"),
])
def test_bad_configs_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(["experiment=demo", *override])
    assert key in str(error.value)


def test_a_type_error_is_rejected():
    with pytest.raises(ConfigError, match="zero.stage"):
        load_config(["zero.stage=two"])


def test_yaml_round_trip_keeps_every_value():
    cfg = load_config(["experiment=demo", "model.dim=64"])
    again = from_yaml(to_yaml(cfg))
    assert again == cfg
    assert trajectory_hash(again) == trajectory_hash(cfg)


def test_resume_check_names_keys_that_change_training_and_ignores_bookkeeping():
    base = load_config(["experiment=demo"])
    bookkeeping = load_config(["experiment=demo", "tracking.log_every=1", "train.checkpoint_every=7",
                               "data.num_workers=1"])
    assert changed_trajectory_keys(base, bookkeeping) == []
    assert trajectory_hash(base) == trajectory_hash(bookkeeping)
    changed = load_config(["experiment=demo", "model.depth=2", "curriculum.stages.1.lr=0.1"])
    assert changed_trajectory_keys(base, changed) == ["curriculum.stages.1.lr", "model.depth"]


def test_every_shipped_model_size_validates_with_the_realistic_curriculum():
    from pathlib import Path

    sizes = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "model").glob("*.yaml"))
    assert {"tiny", "S", "B", "L", "XL", "1B", "3B", "7B"} <= set(sizes)
    assert {"wan_1.3B", "wan_14B"} <= set(sizes)
    for size in set(sizes) - {"tiny"}:  # tiny trains in pixel space: the demo curriculum
        # Wan's configs point at local UMT5 and Wan VAE directories the user names.
        paths = ["model.text.path=/models/umt5", "model.autoencoder.path=/models/vae"] if size.startswith("wan") else []
        cfg = load_config([f"model={size}", "curriculum=t2v_3stage", *paths])
        assert [s.name for s in cfg.curriculum.stages] == ["256p", "480p", "720p"]


def test_sequence_parallelism_is_checked_against_the_world_the_run_has():
    """`python -m train` checks against torchrun's world; `python -m launch` against the launcher's."""
    from train.main import main

    assert load_config(["experiment=demo", "parallel.sequence=2"], world_size=4).parallel.sequence == 2
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        load_config(["experiment=demo", "parallel.sequence=2"], world_size=3)
    with pytest.raises(ConfigError, match="train.method=vae trains without it"):
        load_config(["experiment=vae_demo", "parallel.sequence=2"], world_size=2)
    assert main(["--dry-run", "experiment=demo", "parallel.sequence=2"]) == 2  # a plain run is a world of one


def test_the_degree_is_ulysses_times_ring_and_a_config_from_before_the_ring_keeps_its_meaning():
    old = load_config(["experiment=demo", "parallel.sequence=2"], world_size=2).parallel
    assert (old.sequence, old.ulysses, old.ring) == (2, 2, 1)
    hybrid = load_config(["experiment=demo", "parallel.ulysses=2", "parallel.ring=2"], world_size=4).parallel
    assert (hybrid.sequence, hybrid.ulysses, hybrid.ring) == (4, 2, 2)
    split = load_config(["experiment=demo", "parallel.sequence=8", "parallel.ring=4"], world_size=8).parallel
    assert (split.sequence, split.ulysses, split.ring) == (8, 2, 4)
    # A ring takes any degree: 3 ranks for a model of 4 heads, which Ulysses alone refuses
    ring_of_three = load_config(["experiment=demo", "parallel.ulysses=1", "parallel.ring=3"], world_size=3)
    assert ring_of_three.parallel.sequence == 3


def test_the_minute_curriculum_validates_for_the_sizes_and_degrees_heads_allow():
    cfg = load_config(["model=7B", "curriculum=t2v_minute", "parallel.sequence=12", "launcher.nodes=3"])
    assert cfg.curriculum.stages[-1].token_budget == 1_299_600  # 361 latent frames x 3,600 tokens
    with pytest.raises(ConfigError, match="does not divide model.heads=12"):
        load_config(["model=1B", "curriculum=t2v_minute", "parallel.sequence=8"])
    # The case: a 7B (24 heads) at N = 16 on two 8-GPU nodes, Ulysses 8 inside a node x a ring of 2 across
    seven = load_config(["model=7B", "curriculum=t2v_minute", "parallel.ulysses=8", "parallel.ring=2",
                         "launcher.nodes=2"]).parallel
    assert (seven.sequence, seven.ulysses, seven.ring) == (16, 8, 2)


@pytest.mark.parametrize("override, key", [
    ("model.conditioning=concat", "model.conditioning"),
    ("model.autoencoder.name=jpeg", "model.autoencoder.name"),
    ("model.text.tokenizer=chars", "model.text.tokenizer"),
    ("data.coordinator=zookeeper", "data.coordinator"),
    ("curriculum.stages.0.schedule=linear", "curriculum.stages[0].schedule"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("zero.gradient_accumulation_steps=0", "zero.gradient_accumulation_steps"),
    ("tracking.sampler=ddim", "tracking.sampler"),
    ("train.method=gan", "train.method"),
    ("+launcher.env.HF_TOKEN=abc", "launcher.env.HF_TOKEN: launcher.env is written into job scripts"),
])
def test_dry_run_rejects_each_sections_invalid_value_naming_the_key(override, key, capsys):
    """Every section checks itself (beside its code); `python -m train --dry-run` reports the key, status 2."""
    from train.main import main

    assert main(["--dry-run", "experiment=demo", override]) == 2
    assert key in capsys.readouterr().err


def test_a_config_saved_before_the_video_keys_were_renamed_still_loads():
    cfg = load_config(["experiment=demo", "tracking.video_every=7"])
    old = to_yaml(cfg).replace("video_every:", "sample_every:").replace("video_prompts:", "sample_prompts:")
    old = old.replace("sampling_steps:", "sample_steps:")
    assert "sample_every: 7" in old and from_yaml(old) == cfg


def test_lora_targets_that_name_no_layer_are_rejected_with_the_layer_names():
    with pytest.raises(ConfigError, match="name no linear layer of model.arch=kino; its layers end in: .*qkv"):
        load_config(["experiment=demo", "model.lora.rank=4"])  # the default targets are Wan's
    cfg = load_config(["experiment=demo", "model.lora.rank=4", "model.lora.targets=[qkv,fc1]"])
    assert cfg.model.lora.scale_alpha == 4.0
