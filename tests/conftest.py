import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
