import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parents[1]

# 16 procedural CC0 clips + 4 the license gate must drop + 1 corrupt video, 4 samples per shard.
GOOD_SAMPLES = 16
GATED = {"nolicense-00": "license_missing", "nolicense-01": "license_missing",
         "disallowed-00": "license_not_allowed", "disallowed-01": "license_not_allowed"}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from data.demo_set import build

    root = tmp_path_factory.mktemp("tiny_dataset")
    build(root, procedural=GOOD_SAMPLES, real=False, samples_per_shard=4, seed=0)
    return root


@pytest.fixture(scope="session")
def demo_like_dataset(tmp_path_factory) -> Path:
    """The demo's procedural clips (all durations and aspect ratios), without the network fetch."""
    from data.demo_set import build

    root = tmp_path_factory.mktemp("demo_like")
    build(root, procedural=48, real=False, samples_per_shard=8, seed=0)
    return root


_SHARED_RAY = {}


def shared_ray_address() -> str:
    """One Ray head for the whole session, started on first use, for the runs that are not about Ray itself: each
    run's data coordinator is an actor in a namespace of its own run directory (data/coordinator.py), so runs never
    share a plan. A private head costs a launch about 8 s on the 2-core machine. Tests that kill Ray, or check that
    a run starts its own, keep the private one (no data.ray_address)."""
    if "address" not in _SHARED_RAY:
        from data.ray_head import start_private_head

        # 2 CPUs: room for `data encode --workers 2`'s encoder actors (test_latent_cache); coordinators take none
        _SHARED_RAY["process"], _SHARED_RAY["address"] = start_private_head(256 * 2 ** 20, num_cpus=2)
    return _SHARED_RAY["address"]


def pytest_sessionfinish(session):
    if "process" in _SHARED_RAY:
        from data.ray_head import stop_process_group

        stop_process_group(_SHARED_RAY.pop("process"))
        _SHARED_RAY.clear()


def assert_same_ema(a: Path, b: Path, updates=None) -> None:
    """Two checkpoints hold the same EMA: the same number of updates and, consolidated from each one's rank
    files (whatever world size wrote them), equal weights."""
    import torch

    from train.checkpoint import shard_files
    from train.ema import read_ema_file
    from train.export import ema_weights

    counts = {read_ema_file(f)["updates"] for path in (a, b) for f in shard_files(path, "ema")}
    assert len(counts) == 1 and (updates is None or counts == {updates}), counts
    wa, wb = ema_weights(a), ema_weights(b)
    assert sorted(wa) == sorted(wb)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


def free_port() -> int:
    from data.ray_head import free_local_port

    return free_local_port()


@pytest.fixture(scope="session")
def tiny_wan_vae(tmp_path_factory):
    """A diffusers AutoencoderKLWan, tiny and random (2x temporal, 4x spatial, 4 latent channels)."""
    return write_tiny_wan_vae(tmp_path_factory.mktemp("wan_vae"))


def write_tiny_wan_vae(path):
    import diffusers
    import torch

    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                               latents_std=[1.5, 2.0, 0.5, 1.0], scale_factor_temporal=2,
                               scale_factor_spatial=4).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """A transformers T5 encoder (24 wide) and its tokenizer, tiny and random."""
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


def write_tiny_t5(path):
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a red circle moving left on a black background", "a blue square moving up"],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    config = transformers.T5Config(vocab_size=tok.get_vocab_size(), d_model=24, d_kv=8, d_ff=48, num_layers=2,
                                   num_heads=3, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(path)
    return path


# `make test` runs two pytest-xdist workers with --dist loadfile: each module runs whole on one worker (its
# module-scoped runs, a SLURM cluster, the golden model are built once), modules dealt in collection order. Dealt
# longest first (seconds of one module on the 2-core machine, BENCHMARKS.md), the two workers finish together; the
# many short modules come last and fill the gaps. The order is all this changes: it never skips or merges a test.
LONGEST_FIRST = ("test_slurm", "test_training", "test_latent_cache", "test_sequence_parallel", "test_launch_local",
                 "test_learning", "test_gpu_check", "test_gpu_suite", "test_first_hour", "test_object_storage",
                 "test_data_cli", "test_wan", "test_wan_i2v", "test_k8s_manifests")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep pytest's order, each module stays together
