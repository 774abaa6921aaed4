"""Datasets in object storage: a real S3-compatible server (moto in server mode) on 127.0.0.1, started by the test.
Ingest writes shards and manifest into the bucket, training streams them on 2 ranks with loader workers (ranged
reads, no local copy), a killed-and-resumed run continues, a takedown rewrites the bucket's shards and the resume
refuses the change until allowed, a latent cache is encoded into the bucket and trained from, and the audit
answers. Credentials come from the environment only: the secret appears in no file of the run or the bucket."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.exactly_once import assert_exactly_once
from tests.s3_server import files_under, local_s3, make_bucket
from tests.integration.first_hour import HOLDERS, write_table

SECRET = "kino-test-secret-7f3a9c"  # what must never be written anywhere


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server on a free port (tests/s3_server.py), a bucket, and the environment a user would set, in this
    process and the commands it starts."""
    import tests.integration.test_latent_cache as latent_cache
    import tests.integration.test_training as training

    with local_s3(tmp_path_factory.mktemp("moto") / "moto.log", SECRET) as env:
        environments = (os.environ, training.ENV, latent_cache.ENV)
        saved = [{key: where.get(key) for key in env} for where in environments]
        for where in environments:
            where.update(env)
        make_bucket("kino-test")
        yield "s3://kino-test"
        for where, before in zip(environments, saved):
            for key, value in before.items():
                if value is None:
                    where.pop(key, None)
                else:
                    where[key] = value


def data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


def test_ingest_train_resume_takedown_and_audit_with_the_data_in_object_storage(s3, tmp_path):
    from tests.integration.test_training import torchrun

    write_table(tmp_path / "videos", tmp_path / "meta.csv", count=16)
    dataset = f"{s3}/mine"
    ingested = data_cli("ingest", "--videos", str(tmp_path / "videos"), "--metadata", str(tmp_path / "meta.csv"),
                        "--out", dataset, "--samples-per-shard", "4")
    assert ingested.returncode == 0, ingested.stderr
    assert not list(Path(tmp_path).glob("**/*.tar")), "ingest left a local copy of a shard"
    assert data_cli("verify", dataset).returncode == 0

    run = tmp_path / "run"
    common = ("data.num_workers=1", "data.coordinator=ray", "data.chunk_samples=2")
    torchrun(run, dataset, *common, "train.stop_after_steps=4")  # 2 ranks x 1 loader worker, stops at step 4
    torchrun(run, dataset, *common, "tracking.mode=offline")  # resumes from step 4 to the end; W&B files too
    assert json.loads((run / "checkpoints" / "step_8" / "audit.json").read_text())["dataset"] == dataset
    assert_exactly_once(run)
    config = (run / "config.yaml").read_text()
    assert f"root: {dataset}" in config

    # A takedown rewrites the bucket's shards; the run's checkpoints that used the holder are named.
    taken = data_cli("takedown", dataset, "--rights-holder", HOLDERS[1], "--run", str(run))
    assert taken.returncode == 0, taken.stderr
    assert "removed 8 samples" in taken.stdout and "checkpoints/step_4 (step 4)" in taken.stdout
    assert data_cli("verify", dataset).returncode == 0
    assert any(p.name.startswith("takedown-") for p in files_under(f"{dataset}/takedowns"))

    # Resuming the earlier checkpoint onto the changed bucket is refused, then allowed.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_8")
    from tests.forked_ranks import run_ranks
    from tests.integration.test_training import ENV, run_command

    refused = run_ranks(run_command(run, dataset, *common), cwd=REPO, env=ENV, timeout=600)
    assert refused.returncode != 0 and "data.allow_changed_dataset=true" in refused.stderr
    torchrun(run, dataset, *common, "data.allow_changed_dataset=true")
    after = json.loads((run / "checkpoints" / "step_8" / "audit.json").read_text())
    audit = data_cli("audit", str(run), "--rights-holder", HOLDERS[0])
    assert audit.returncode == 0 and "step_8" in audit.stdout
    assert sum(after["license_totals"].values()) > 0

    # A latent cache encoded into the bucket, and a run that reads every stage from it.
    cache = f"{s3}/mine-latents"
    from tests.integration.test_latent_cache import MODEL, train

    # Its own Ray cluster, started with this environment: the encoder actors read the bucket with its credentials
    # (the session's shared Ray head was started before them).
    encoded = data_cli("encode", dataset, "--out", cache, "experiment=demo", *MODEL)
    assert encoded.returncode == 0, encoded.stderr[-3000:]
    cached_run = tmp_path / "cached"
    train(cached_run, dataset, f"data.latents={cache}")
    assert_exactly_once(cached_run)

    # The secret is in no file Kino wrote: run directories, manifests, reports, shards.
    for folder in (run, cached_run):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    for path in files_under(s3):
        assert SECRET.encode() not in path.read_bytes(), path
