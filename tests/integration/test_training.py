"""Real training: 2 CPU processes, DeepSpeed ZeRO-2 over gloo, W&B offline where a test reads it.

The ranks of most runs are forked from a process that has imported torch and DeepSpeed already
(tests/forked_ranks.py: the same entry point, arguments and rendezvous as under torchrun, without 9 s of imports
a launch); the tests about torchrun itself (its exit summary, a killed process group) run the real one.

Runs share the session's Ray head (tests/conftest.py) unless a test is about Ray itself, and W&B is off unless a
test reads its files: on the 2-core machine each costs a launch seconds that its steps do not. Every run that
stops, resumes, is killed or changes its world is checked with tests/exactly_once.py."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GATED, REPO, assert_same_ema, shared_ray_address
from train.export import ema_weights
from tests.forked_ranks import run_ranks
from tests.exactly_once import assert_epochs_in_step, assert_exactly_once
from train.provenance import read_trained_keys

TINY = ["model.dim=64", "model.depth=2", "model.heads=2", "model.text.dim=32", "model.text.depth=1",
        "model.text.heads=2", "curriculum.stages.0.steps=5", "curriculum.stages.1.steps=3",
        "curriculum.stages.0.token_budget=1600", "curriculum.stages.1.resolutions=[32]",
        "curriculum.stages.1.frame_counts=[8]", "curriculum.stages.1.token_budget=2100",
        "tracking.log_every=1", "tracking.sampling_steps=3", "train.checkpoint_every=4",
        "tracking.eval_prompts=0", "tracking.eval_clips=0"]  # evaluation has its own tests


def run_command(run_dir: Path, dataset: Path, *overrides: str, nproc: int = 2, module=("-m", "train"),
                private_ray: bool = False):
    """torchrun of `module` over TINY and `overrides`: on the session's Ray head when the run needs Ray (several
    ranks or loader workers) and `private_ray` is not asked for; W&B off unless an override sets tracking.mode."""
    words = list(overrides)
    needs_ray = nproc > 1 or any(w.startswith("data.num_workers=") and w != "data.num_workers=0" for w in words)
    if needs_ray and not private_ray and not any(w.startswith("data.ray_address=") for w in words):
        words.append(f"data.ray_address={shared_ray_address()}")
    if not any(w.startswith("tracking.mode=") for w in words):
        words.append("tracking.mode=disabled")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module,
            "experiment=demo", f"data.root={dataset}", f"train.run_dir={run_dir}", *TINY, *words]


ENV = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")


def torchrun(run_dir: Path, dataset: Path, *overrides: str, nproc: int = 2, module=("-m", "train"),
             private_ray: bool = False, status: int = 0, real_torchrun: bool = False) -> subprocess.CompletedProcess:
    """The run's ranks forked (tests/forked_ranks.py), or under the real torchrun when `real_torchrun`."""
    command = run_command(run_dir, dataset, *overrides, nproc=nproc, module=module, private_ray=private_ray)
    if real_torchrun:
        result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    else:
        result = run_ranks(command, cwd=REPO, env=ENV, timeout=600)
    assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def probed(run_dir: Path, dataset: Path, out: Path, *overrides: str, nproc: int = 2):
    """A run under tests/integration/state_probe_run.py: it also writes the engine's full fp32 state after a resume
    (OUT.resumed.pt) and at the end (OUT.final.pt)."""
    return torchrun(run_dir, dataset, *overrides, nproc=nproc,
                    module=("-m", "tests.integration.state_probe_run", str(out)))


def assert_same_engine_state(saved: Path, resumed: Path) -> None:
    """The fp32 weights, both Adam moments and the EMA (every parameter, consolidated from the ranks' pieces) a
    resume loaded are those the previous run ended with, whatever the two runs' world sizes."""
    import torch

    a, b = torch.load(saved), torch.load(resumed)
    assert a["step"] == b["step"] and a["ema_updates"] == b["ema_updates"] == a["step"]
    assert a["ema"].keys() == b["ema"].keys() and set(a["weights"]) <= set(a["ema"])
    for name in a["ema"]:
        assert torch.equal(a["ema"][name], b["ema"][name]), ("ema", name)
    # the EMA is not the weights (else the comparison above would not tell an EMA restored from one reset to them)
    assert any(not torch.equal(a["ema"][n], a["weights"][n]) for n in a["weights"])
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        assert a[part].keys() == b[part].keys() and a[part], part
        for name in a[part]:
            assert torch.allclose(a[part][name], b[part][name], rtol=1e-6, atol=1e-9), (part, name)
        assert any(bool(v.abs().sum() > 0) for v in b[part].values()), f"{part}: all zero after the resume"


def metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dataset):
    """The tiny run at the defaults (ZeRO-2 on 2 ranks), W&B offline, every checkpoint kept."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = torchrun(run_dir, tiny_dataset, "tracking.mode=offline", "train.keep_last=5")
    return run_dir, result


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_dataset):
    run_dir = tmp_path_factory.mktemp("run") / "zero3"
    torchrun(run_dir, tiny_dataset, "zero.stage=3", "train.keep_last=5")
    return run_dir


def test_zero2_run_writes_the_run_directory_contract(finished_run):
    run_dir, result = finished_run
    assert (run_dir / "config.yaml").exists()
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_8" and (latest / "COMPLETE").exists()
    for name in ("train_state.json", "audit.json", "config.yaml", "engine"):
        assert (latest / name).exists(), name
    # the EMA: one file per rank, each rank's pieces of the trained weights
    assert sorted(p.name for p in (latest / "ema").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    # ZeRO-2 over 2 ranks: each rank wrote its own optimizer shard
    assert len(list((latest / "engine").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("step", "stage", "loss", "lr", "tokens_per_s", "mfu", "data_wait_frac"):
        assert all(key in r for r in rows), key
    assert [r["stage"] for r in rows] == ["main"] * 5 + ["anneal"] * 3
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    samples = list((run_dir / "videos" / "step_8").glob("*"))
    assert {p.suffix for p in samples} == {".mp4", ".gif"} and all(p.stat().st_size > 0 for p in samples)
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert "kino run finished" in result.stdout
    # both ranks' acknowledgements reached the Ray coordinator through one call a step (train/ack_relay.py)
    assert "8 acknowledgement call(s) this launch (2 rank(s) a call)" in result.stdout, result.stdout[-2000:]
    assert_exactly_once(run_dir)
    assert_epochs_in_step(run_dir)  # 4 epochs over 2 ranks (data.strict_epochs)


def test_only_licensed_samples_were_trained_and_the_audit_says_so(finished_run):
    run_dir, result = finished_run
    records = list(read_trained_keys(run_dir))
    keys = [k for r in records for k in r["keys"]]
    assert keys and not set(keys) & set(GATED) and "corrupt-00" not in keys
    assert {lic for r in records for lic in r["licenses"]} == {"CC0-1.0"}
    assert max(r["step"] for r in records) == 8
    audit = json.loads((run_dir / "checkpoints" / "step_8" / "audit.json").read_text())
    assert sum(audit["license_totals"].values()) == len(keys)
    assert set(audit["license_totals"]) == {"CC0-1.0"}
    assert audit["dropped"]["license_missing"] >= 2 and audit["dropped"]["license_not_allowed"] >= 2
    assert set(audit["dropped_examples"]["license_missing"]) == {"nolicense-00", "nolicense-01"}
    assert "license_missing=" in result.stdout and "license_not_allowed=" in result.stdout


def test_a_finished_run_resumes_and_says_there_is_nothing_left(finished_run, tiny_dataset):
    run_dir, _ = finished_run
    result = torchrun(run_dir, tiny_dataset)
    assert "resuming from" in result.stdout and "step_8" in result.stdout
    assert "nothing to train" in result.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))  # nothing trained or logged again
    assert_exactly_once(run_dir)


def test_stop_and_resume_reproduces_the_straight_run_exactly(finished_run, tiny_dataset, tmp_path):
    straight, _ = finished_run
    interrupted = tmp_path / "interrupted"
    first = torchrun(interrupted, tiny_dataset, "train.stop_after_steps=3")
    assert "stopping at step 3" in first.stdout
    second = torchrun(interrupted, tiny_dataset)
    assert "resuming from" in second.stdout and "step_3" in second.stdout
    # the second half crosses the stage change at step 5
    assert [r["loss"] for r in metrics(interrupted)] == [r["loss"] for r in metrics(straight)]
    assert_same_ema(straight / "checkpoints" / "step_8", interrupted / "checkpoints" / "step_8", updates=8)
    trained = sorted(k for r in read_trained_keys(interrupted) for k in r["keys"])
    assert trained == sorted(k for r in read_trained_keys(straight) for k in r["keys"])
    assert_exactly_once(interrupted)


def test_resume_refuses_a_config_that_changes_training(finished_run, tiny_dataset):
    run_dir, _ = finished_run
    command = [sys.executable, "-m", "train", "experiment=demo", f"data.root={tiny_dataset}",
               f"train.run_dir={run_dir}", *TINY, "model.depth=3", "tracking.mode=disabled"]
    result = run_ranks(command, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.startswith("kino:")]
    assert len(said) == 1 and "the config changed keys that shape training: model.depth" in said[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_8"  # nothing written


def test_bad_config_is_rejected_before_any_process_starts():
    result = subprocess.run([sys.executable, "-m", "train", "experiment=demo", "zero.stage=7"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "zero.stage=7" in result.stderr
    assert "DeepSpeed" not in result.stdout + result.stderr


def test_a_run_whose_data_is_not_there_is_refused_before_any_process_group_starts(tiny_dataset, tmp_path):
    result = subprocess.run([sys.executable, "-m", "train", "experiment=demo", f"data.root={tmp_path / 'nowhere'}",
                             f"data.validation_root={tmp_path / 'held_out'}", "tracking.mode=disabled"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"data.root={tmp_path / 'nowhere'}: no manifest.json" in result.stderr
    assert f"data.validation_root={tmp_path / 'held_out'}: no manifest.json" in result.stderr
    assert "Traceback" not in result.stderr and "DeepSpeed" not in result.stdout + result.stderr


def test_a_forced_attention_kernel_this_machine_cannot_run_is_refused_at_start_up(tiny_dataset, tmp_path):
    result = run_ranks([sys.executable, "-m", "train", "experiment=demo", f"data.root={tiny_dataset}",
                        f"train.run_dir={tmp_path / 'forced'}", *TINY, "model.attention_backend=torch_varlen",
                        "tracking.mode=disabled"], cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert "model.attention_backend" in result.stderr and "fp16/bf16 on CUDA only" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "forced" / "metrics.jsonl").exists()


def test_a_stage_whose_every_sample_is_dropped_stops_with_the_reasons_instead_of_looping(tiny_dataset, tmp_path):
    """Every clip of the tiny dataset lasts 1 s; a stage of 4 s clips drops them all as too short. The run once
    read epoch after epoch without a word."""
    result = run_ranks([sys.executable, "-m", "train", "experiment=demo", f"data.root={tiny_dataset}",
                        f"train.run_dir={tmp_path / 'empty'}", *TINY, "curriculum.stages.0.frame_counts=[32]",
                        "curriculum.stages.0.token_budget=4096", "tracking.mode=disabled"], cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "stage 'main' can train on nothing" in result.stderr and "too_short=" in result.stderr
    assert "license_missing=" in result.stderr and "Traceback" not in result.stderr


def test_a_fresh_start_keeps_the_previous_run_aside(finished_run, tiny_dataset, tmp_path):
    run_dir = tmp_path / "fresh"
    shutil.copytree(finished_run[0], run_dir)
    result = torchrun(run_dir, tiny_dataset, "train.resume=false", "train.stop_after_steps=1")
    assert "starting fresh" in result.stdout and "resuming" not in result.stdout
    previous = list((run_dir / "previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "step_8" / "COMPLETE").exists()
    assert [r["step"] for r in metrics(previous[0])] == list(range(1, 9))
    assert [r["step"] for r in metrics(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert_exactly_once(run_dir)  # the fresh run's own provenance: the old run's moved aside with it


def test_the_audit_at_every_checkpoint_matches_what_the_model_saw(finished_run):
    run_dir, _ = finished_run
    records = list(read_trained_keys(run_dir))
    for step in (4, 8):
        audit = json.loads((run_dir / "checkpoints" / f"step_{step}" / "audit.json").read_text())
        seen = [lic for r in records if r["step"] <= step for lic in r["licenses"]]
        assert audit["license_totals"] == {"CC0-1.0": len(seen)}
        assert sum(sum(c.values()) for c in audit["rights_holders"].values()) == len(seen)
        assert set(audit["dropped_examples"]["license_missing"]) <= set(GATED)
        assert set(audit["dropped"]) <= {"license_missing", "license_not_allowed", "undecodable"}
        dropped = [d for r in records if r["step"] <= step for d in r["dropped"]]  # provenance says the same
        assert sum(audit["dropped"].values()) == len(dropped)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_run_resumes_on_a_different_number_of_ranks_without_repeating_data(stage, tiny_dataset, tmp_path):
    """2 ranks, then 1 (the checkpoint loads through DeepSpeed's universal format): the weights and Adam moments
    loaded are those saved, the rest of the epoch is dealt out anew, and no sample trains twice. ZeRO-3 in fp32
    too, where the optimizer's master partition is the module's own (train/engine.py `fp32_master_shared`)."""
    run_dir = tmp_path / "resized"
    zero = f"zero.stage={stage}"
    probed(run_dir, tiny_dataset, tmp_path / "first", "train.stop_after_steps=3", "data.chunk_samples=2", zero)
    result = probed(run_dir, tiny_dataset, tmp_path / "then", "data.chunk_samples=2", "train.stop_after_steps=2",
                    zero, nproc=1)
    assert "dealt out anew" in result.stdout and "universal format" in result.stdout
    assert_same_engine_state(tmp_path / "first.final.pt", tmp_path / "then.resumed.pt")
    records = list(read_trained_keys(run_dir))
    assert [r["step"] for r in records if r["step"] > 3] == [4, 5]
    assert_exactly_once(run_dir)
    assert_epochs_in_step(run_dir)


def test_decoding_in_spawned_loader_workers_reaches_the_ray_coordinator(tiny_dataset, tmp_path):
    run_dir = tmp_path / "workers"
    torchrun(run_dir, tiny_dataset, "data.num_workers=1", "curriculum.stages.0.steps=3",
             "curriculum.stages.1.steps=1")
    keys = [k for r in read_trained_keys(run_dir) for k in r["keys"]]
    assert keys and not set(keys) & set(GATED)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert_exactly_once(run_dir)
    assert_epochs_in_step(run_dir)


def _parent_pid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tiny_dataset, tmp_path):
    import signal
    import time

    run_dir = tmp_path / "killed"
    # checkpoints from step 8 on hang before COMPLETE
    command = run_command(run_dir, tiny_dataset, module=("-m", "tests.integration.slow_checkpoint_run", "8", "60"))
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    partial = run_dir / "checkpoints" / ".partial_step_8"
    deadline = time.time() + 300
    while not (partial / "engine").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # the engine shards are on disk; COMPLETE is not
    # As a node failure would: torchrun and its ranks, which torchrun starts in sessions of their own (a rank
    # left alive would go on writing into the run directory the resumed run below uses).
    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent_pid(p) == process.pid]
    for pid in [process.pid, *ranks]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    assert partial.exists() and not (partial / "COMPLETE").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert not (run_dir / "checkpoints" / "step_8").exists()

    result = torchrun(run_dir, tiny_dataset)
    assert "resuming from" in result.stdout and "step_4" in result.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_8"
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))  # steps 5-8 trained once, logged once
    # steps 5-8 recorded once per rank that trained in them (a rank whose batch the epoch gate held records none)
    for rank_file in sorted((run_dir / "provenance").glob("rank_*.jsonl")):
        steps = [json.loads(line)["step"] for line in rank_file.read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 8, (rank_file.name, steps)
    assert not partial.exists()  # the stale half checkpoint was cleaned up
    assert_exactly_once(run_dir)
    assert_epochs_in_step(run_dir)


def test_zero_stages_1_2_and_3_train_the_same_losses(finished_run, zero3_run, tiny_dataset, tmp_path):
    """ZeRO-1, 2 and 3 partition the same computation differently: over the same batches they must give the same
    losses, to the summation order of their reductions (a stage that scaled its gradients differently would not)."""
    zero1 = tmp_path / "zero1"
    torchrun(zero1, tiny_dataset, "zero.stage=1")
    reference = [r["loss"] for r in metrics(finished_run[0])]
    assert len(reference) == 8 and reference[-1] != reference[0]
    for run_dir in (zero1, zero3_run):
        assert [r["loss"] for r in metrics(run_dir)] == pytest.approx(reference, rel=1e-5), run_dir.name
    assert len(list((zero3_run / "checkpoints" / "step_8" / "engine").glob("zero_pp_rank_*_model_states.pt"))) == 2


def test_zero3_stop_and_resume_is_exact_including_the_ema(zero3_run, tiny_dataset, tmp_path):
    straight, interrupted = zero3_run, tmp_path / "z3_interrupted"
    torchrun(interrupted, tiny_dataset, "zero.stage=3", "train.stop_after_steps=3")
    torchrun(interrupted, tiny_dataset, "zero.stage=3")
    assert [r["loss"] for r in metrics(interrupted)] == [r["loss"] for r in metrics(straight)]
    assert_same_ema(straight / "checkpoints" / "step_8", interrupted / "checkpoints" / "step_8", updates=8)
    assert_exactly_once(interrupted)


def test_bf16_trains_stops_resumes_exactly_and_samples_in_bf16(tiny_dataset, tmp_path):
    """zero.precision=bf16 on 2 CPU ranks under ZeRO-2: the path a GPU user takes first (issue 18: fp32 latents
    reached the bf16 engine and failed at step 1). Stop, resume, the same losses as a straight run, samples."""
    import torch

    straight, interrupted = tmp_path / "bf16_straight", tmp_path / "bf16_interrupted"
    common = ("zero.precision=bf16",)
    torchrun(straight, tiny_dataset, *common)
    first = torchrun(interrupted, tiny_dataset, *common, "train.stop_after_steps=3")
    assert "stopping at step 3" in first.stdout
    second = torchrun(interrupted, tiny_dataset, *common)
    assert "resuming from" in second.stdout and "step_3" in second.stdout
    losses = [r["loss"] for r in metrics(interrupted)]
    assert losses == [r["loss"] for r in metrics(straight)] and all(0 < loss < 10 for loss in losses)
    ema = ema_weights(interrupted / "checkpoints" / "step_8")
    assert all(w.dtype == torch.float32 for w in ema.values())  # the EMA stays fp32
    assert_exactly_once(interrupted)
    samples = sorted((interrupted / "videos" / "step_8").glob("*.mp4"))
    assert len(samples) == 3  # one per prompt, at the last stage's shapes
    import av
    import numpy as np

    for path in samples:  # real videos of the named shape, with pictures in them (not one flat or broken colour)
        frames, height, width = (int(n) for n in path.stem.rsplit("-", 1)[1].split("x")[::-1])
        with av.open(str(path)) as container:
            decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert decoded.shape == (frames, height, width, 3), (path.name, decoded.shape)
        assert decoded.std() > 2 and len(np.unique(decoded)) > 16, path.name


def test_export_loads_into_a_fresh_model_and_reproduces_the_ema_samples(finished_run, tmp_path):
    import torch

    from data.buckets import BucketShape
    from models.autoencoder import build_autoencoder
    from models.dit import TextToVideoModel, text_conditioner
    from conf.schema import from_yaml
    from train.export import export, load_exported
    from train.generate import generate

    run_dir, _ = finished_run
    out = export(run_dir, out=tmp_path / "export")
    cfg, exported = load_exported(out)
    reference = TextToVideoModel(cfg.model)
    reference.load_state_dict(ema_weights(run_dir / "checkpoints" / "step_8"))
    shapes, prompts = [BucketShape(8, 32, 32)], ["a red circle moving right on a black background"]
    ae, text = build_autoencoder(cfg.model.autoencoder), text_conditioner(cfg.model)
    args = (prompts, shapes, 3, 3.0, 0, cfg.train.shift_reference_tokens, "cpu")
    assert torch.equal(generate(exported, ae, text, *args)[0], generate(reference, ae, text, *args)[0])
    assert from_yaml((out / "config.yaml").read_text()) == cfg


def test_non_finite_losses_are_skipped_counted_and_abort_the_run_with_a_clear_message(tiny_dataset, tmp_path):
    run_dir = tmp_path / "nan"
    result = torchrun(run_dir, tiny_dataset, "curriculum.stages.0.lr=1e30", "curriculum.stages.0.warmup_steps=0",
                      "optim.grad_clip=0", "train.max_nonfinite_in_row=3", status=1,  # torchrun's, for a failed rank
                      real_torchrun=True)
    assert "exitcode  : 3" in result.stderr, result.stderr[-3000:]  # each rank's documented status for this stop
    said = [line for line in result.stderr.splitlines() if line.startswith("kino:")]
    assert said == [said[0]] and "training stopped: 3 non-finite losses in a row" in said[0], result.stderr[-3000:]
    assert "raise NonFiniteLoss" not in result.stderr  # a message, not our traceback (torchrun adds its own)
    rows = metrics(run_dir)
    skipped = [r for r in rows if r["loss"] is None]  # the third aborts the run before it is logged
    assert len(skipped) == 2 and skipped[-1]["nonfinite_steps"] == 2
    assert "step skipped" in result.stdout
    # The skipped steps' samples are recorded as dropped for that reason, each once.
    nonfinite = [d for r in read_trained_keys(run_dir) for d in r["dropped"] if d[3] == "nonfinite_step"]
    assert nonfinite and len({tuple(d[:3]) for d in nonfinite}) == len(nonfinite)


def _weights_after_poison(tmp_path, dataset, stage: int, patterns):
    """Two steps at gradient accumulation 2 with the chosen forward passes made non-finite, one run per pattern in
    one launch; each run's final weights and metrics."""
    out = tmp_path / f"poison-zero{stage}"
    out.mkdir()
    command = run_command(out / "unused", dataset, f"zero.stage={stage}", "zero.gradient_accumulation_steps=2",
                          "train.stop_after_steps=2", "tracking.video_every=0",
                          module=("-m", "tests.integration.nonfinite_run", str(out), ";".join(patterns)))
    result = run_ranks(command, cwd=REPO, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import torch

    from tests.integration.nonfinite_run import label

    return [(torch.load(out / f"{label(p)}.pt"), metrics(out / f"run-{label(p)}")) for p in patterns]


@pytest.mark.parametrize("stage", [2, 3])  # DeepSpeed's ZeRO-1/2 and ZeRO-3 optimizers each skip on their own
def test_a_non_finite_micro_batch_skips_its_whole_step_and_nothing_leaks_into_the_next(tiny_dataset, tmp_path, stage):
    # Step 1 holds forward passes 0 and 1, step 2 passes 2 and 3. Poisoning pass 1 alone must leave exactly
    # what poisoning both leaves: step 1 skipped whole (micro-batch 0's gradient discarded, not carried into
    # step 2 by a shifted accumulation boundary), step 2 trained on its own two micro-batches.
    import torch

    (one, one_rows), (both, _), (clean, _) = _weights_after_poison(tmp_path, tiny_dataset, stage, ["1", "0,1", ""])
    assert all(torch.equal(one[name], both[name]) for name in both)
    assert [r["loss"] is None for r in one_rows] == [True, False] and one_rows[-1]["nonfinite_steps"] == 1
    assert not all(torch.equal(clean[name], both[name]) for name in both)  # step 1 would have changed them


def test_deepspeeds_own_zero_to_fp32_script_works_as_its_users_run_it(finished_run, tmp_path):
    # DeepSpeed copies zero_to_fp32.py into every checkpoint; run plainly (no --tag) it must find the engine.
    import torch
    from safetensors.torch import load_file

    from train.export import raw_weights

    run_dir, _ = finished_run
    checkpoint = (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()).resolve()
    done = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "out"), "--safe_serialization"],
                          cwd=checkpoint, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    converted = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = raw_weights(checkpoint)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k].float(), expected[k].float()) for k in expected)


# On the CPU, per-clip SDPA reads the clips' lengths on the host (a data-dependent break at each attention; the fused
# varlen kernels of a CUDA run have none); under sequence parallelism the all-to-alls are kept out of the graph on
# purpose (train/sequence_parallel.py). Any other break (a ZeRO-3 hook inside a block, a fallback to eager) is new.
CPU_BREAKS = {"Data dependent operator"}
SP_BREAKS = {f"Skip calling `torch.compiler.disable()`d function ({name})"
             for name in ("to_heads", "to_sequence", "gather_heads", "ring_self_attention", "stretch_cross_attention")}


@pytest.mark.parametrize("sequence", ["parallel.sequence=1", "parallel.ring=2"])
def test_compiled_blocks_trace_through_zero3_bf16_and_sequence_parallelism_with_only_the_expected_breaks(
        tiny_dataset, tmp_path, sequence):
    """What a GPU run turns on (model.compile under DeepSpeed ZeRO-3 in bf16, and sequence parallelism: a ring of
    2, whose blocks go through the same wrappers as Ulysses' and add the ring's own call), traced by Dynamo and
    AOTAutograd on 2 CPU ranks: every block compiles, and the graph breaks are only the ones named above."""
    import re

    result = torchrun(tmp_path / "compiled", tiny_dataset, "model.compile=true", "model.compile_backend=aot_eager",
                      "zero.stage=3", "zero.precision=bf16", sequence,
                      "curriculum.stages.0.steps=2", "curriculum.stages.1.steps=1", "tracking.video_every=0")
    line = re.search(r"compiled blocks \(model.compile_backend=aot_eager\): (\d+) graph\(s\) from (\d+) compiled "
                     r"frame\(s\), (\d+) graph break\(s\)(?:: (.*))?", result.stdout)
    assert line, result.stdout[-3000:]
    graphs, frames, breaks = (int(line.group(i)) for i in (1, 2, 3))
    assert graphs >= 2 and frames >= 2  # each of the two blocks at least, forward and backward
    kinds = dict(re.match(r"(\d+)x (.*)", part).group(2, 1) for part in (line.group(4) or "").split("; ") if part)
    expected = CPU_BREAKS | (SP_BREAKS if sequence != "parallel.sequence=1" else set())
    assert set(kinds) <= expected, f"unexpected graph breaks: {set(kinds) - expected}"
    assert sum(int(n) for n in kinds.values()) == breaks
    assert all(0 < r["loss"] < 10 for r in metrics(tmp_path / "compiled"))


def test_a_dataset_of_one_shard_trains_on_two_ranks_with_a_decode_worker_each_and_resumes(tmp_path):
    """A user's first dataset is small: 22 clips of their own, ingested from a table, make one shard (64 samples a
    shard), one chunk, for 2 consumers (2 ranks, a decode worker each; 2 x 2 workers: tests/unit/test_small_data.py).
    A consumer with no share of an epoch serves the next one (it once recursed until Python gave up); stopped and
    resumed, every finished epoch trains each sample exactly once, an open one at most once."""
    from data.__main__ import main as data_main
    from tests.integration.first_hour import write_table

    write_table(tmp_path / "videos", tmp_path / "meta.csv", count=22)
    dataset = tmp_path / "one_shard"
    assert data_main(["ingest", "--videos", str(tmp_path / "videos"), "--metadata", str(tmp_path / "meta.csv"),
                      "--out", str(dataset)]) == 0
    shards = json.loads((dataset / "manifest.json").read_text())["shards"]
    assert len(shards) == 1 and shards[0]["num_samples"] == 22
    run_dir = tmp_path / "run"
    first = torchrun(run_dir, dataset, "data.num_workers=1", "train.stop_after_steps=3")
    assert "stopping at step 3" in first.stdout
    second = torchrun(run_dir, dataset, "data.num_workers=1")
    assert "resuming from" in second.stdout and "step_3" in second.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))
    assert_exactly_once(run_dir)


def test_a_run_without_video_prompts_ends_without_videos(tiny_dataset, tmp_path):
    """tracking.video_prompts=[]: the run ends (it once stopped in generation_plan, dividing by no prompts), with no
    videos and no video directory."""
    run_dir = tmp_path / "run"
    result = torchrun(run_dir, tiny_dataset, "tracking.video_prompts=[]", "curriculum.stages.0.steps=1",
                      "curriculum.stages.1.steps=1", "tracking.eval_prompts=0", "tracking.eval_clips=0", nproc=1)
    assert "videos        : -" in result.stdout and not (run_dir / "videos").exists()
    assert (run_dir / "checkpoints" / "step_2").is_dir()
