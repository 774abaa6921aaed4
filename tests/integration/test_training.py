"""Real training: torchrun, 2 CPU processes, DeepSpeed ZeRO-2 over gloo, W&B offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GATED, REPO, free_port
from train.provenance import read_trained_keys

TINY = ["model.dim=64", "model.depth=2", "model.heads=2", "model.text.dim=32", "model.text.depth=1",
        "model.text.heads=2", "curriculum.stages.0.steps=5", "curriculum.stages.1.steps=3",
        "curriculum.stages.0.token_budget=1600", "curriculum.stages.1.resolutions=[32]",
        "curriculum.stages.1.frame_counts=[8]", "curriculum.stages.1.token_budget=2100",
        "tracking.log_every=1", "tracking.sampling_steps=3", "train.checkpoint_every=4",
        "tracking.eval_prompts=0", "tracking.eval_clips=0"]  # evaluation has its own tests


def torchrun(run_dir: Path, dataset: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train", "experiment=demo", f"data.root={dataset}", f"train.run_dir={run_dir}", *TINY,
               *overrides]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dataset):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = torchrun(run_dir, tiny_dataset)
    return run_dir, result


def test_zero2_run_writes_the_run_directory_contract(finished_run):
    run_dir, result = finished_run
    assert (run_dir / "config.yaml").exists()
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_8" and (latest / "COMPLETE").exists()
    for name in ("train_state.json", "audit.json", "ema.pt", "config.yaml", "engine"):
        assert (latest / name).exists(), name
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


def test_stop_and_resume_reproduces_the_straight_run_exactly(finished_run, tiny_dataset, tmp_path):
    straight, _ = finished_run
    interrupted = tmp_path / "interrupted"
    first = torchrun(interrupted, tiny_dataset, "train.stop_after_steps=3")
    assert "stopping at step 3" in first.stdout
    second = torchrun(interrupted, tiny_dataset)
    assert "resuming from" in second.stdout and "step_3" in second.stdout
    # the second half crosses the stage change at step 5
    assert [r["loss"] for r in metrics(interrupted)] == [r["loss"] for r in metrics(straight)]
    import torch

    a = torch.load(straight / "checkpoints" / "step_8" / "ema.pt")
    b = torch.load(interrupted / "checkpoints" / "step_8" / "ema.pt")
    assert a["updates"] == b["updates"] == 8
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    trained = sorted(k for r in read_trained_keys(interrupted) for k in r["keys"])
    assert trained == sorted(k for r in read_trained_keys(straight) for k in r["keys"])


def test_resume_refuses_a_config_that_changes_training(finished_run, tiny_dataset):
    run_dir, _ = finished_run
    command = [sys.executable, "-m", "train", "experiment=demo", f"data.root={tiny_dataset}",
               f"train.run_dir={run_dir}", *TINY, "model.depth=3"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, MASTER_PORT="29531"))
    assert result.returncode != 0
    assert "model.depth" in result.stderr + result.stdout


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
    result = subprocess.run([sys.executable, "-m", "train", "experiment=demo", f"data.root={tiny_dataset}",
                             f"train.run_dir={tmp_path / 'forced'}", *TINY, "model.attention_backend=torch_varlen",
                             "tracking.mode=disabled"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, MASTER_PORT=str(free_port())))
    assert result.returncode == 2
    assert "model.attention_backend" in result.stderr and "fp16/bf16 on CUDA only" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "forced" / "metrics.jsonl").exists()


def test_a_stage_whose_every_sample_is_dropped_stops_with_the_reasons_instead_of_looping(tiny_dataset, tmp_path):
    """Every clip of the tiny dataset lasts 1 s; a stage of 4 s clips drops them all as too short. The run once
    read epoch after epoch without a word."""
    result = subprocess.run([sys.executable, "-m", "train", "experiment=demo", f"data.root={tiny_dataset}",
                             f"train.run_dir={tmp_path / 'empty'}", *TINY, "curriculum.stages.0.frame_counts=[32]",
                             "curriculum.stages.0.token_budget=4096", "tracking.mode=disabled"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, MASTER_PORT=str(free_port())))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "stage 'main' can train on nothing" in result.stderr and "too_short=" in result.stderr
    assert "license_missing=" in result.stderr and "Traceback" not in result.stderr


def test_a_fresh_start_keeps_the_previous_run_aside(tiny_dataset, tmp_path):
    run_dir = tmp_path / "fresh"
    torchrun(run_dir, tiny_dataset, "train.stop_after_steps=2", "tracking.mode=disabled")
    result = torchrun(run_dir, tiny_dataset, "train.resume=false", "train.stop_after_steps=1",
                      "tracking.mode=disabled")
    assert "starting fresh" in result.stdout and "resuming" not in result.stdout
    previous = list((run_dir / "previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "step_2" / "COMPLETE").exists()
    assert [r["step"] for r in metrics(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_1"


def test_the_audit_at_every_checkpoint_matches_what_the_model_saw(tiny_dataset, tmp_path):
    run_dir = tmp_path / "audited"
    torchrun(run_dir, tiny_dataset, "train.keep_last=5", "tracking.mode=disabled")
    records = list(read_trained_keys(run_dir))
    for step in (4, 8):
        audit = json.loads((run_dir / "checkpoints" / f"step_{step}" / "audit.json").read_text())
        seen = [lic for r in records if r["step"] <= step for lic in r["licenses"]]
        assert audit["license_totals"] == {"CC0-1.0": len(seen)}
        assert sum(sum(c.values()) for c in audit["rights_holders"].values()) == len(seen)
        assert set(audit["dropped_examples"]["license_missing"]) <= set(GATED)
        assert set(audit["dropped"]) <= {"license_missing", "license_not_allowed", "undecodable"}


def test_a_run_resumes_on_a_different_number_of_ranks_without_repeating_data(tiny_dataset, tmp_path):
    run_dir = tmp_path / "resized"
    torchrun(run_dir, tiny_dataset, "train.stop_after_steps=3", "tracking.mode=disabled", "data.chunk_samples=2")
    result = torchrun(run_dir, tiny_dataset, "tracking.mode=disabled", "data.chunk_samples=2",
                      "train.stop_after_steps=2", nproc=1)
    assert "dealt out anew" in result.stdout
    records = list(read_trained_keys(run_dir))
    assert [r["step"] for r in records if r["step"] > 3] == [4, 5]


def test_decoding_in_spawned_loader_workers_reaches_the_ray_coordinator(tiny_dataset, tmp_path):
    run_dir = tmp_path / "workers"
    torchrun(run_dir, tiny_dataset, "data.num_workers=1", "curriculum.stages.0.steps=3",
             "curriculum.stages.1.steps=1", "tracking.mode=disabled")
    keys = [k for r in read_trained_keys(run_dir) for k in r["keys"]]
    assert keys and not set(keys) & set(GATED)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


def _parent_pid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tiny_dataset, tmp_path):
    import signal
    import time

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "tests.integration.slow_checkpoint_run", "8", "60",  # checkpoints from step 8 on hang before COMPLETE
               "experiment=demo", f"data.root={tiny_dataset}", f"train.run_dir={run_dir}", *TINY,
               "tracking.mode=disabled"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

    result = torchrun(run_dir, tiny_dataset, "tracking.mode=disabled")
    assert "resuming from" in result.stdout and "step_4" in result.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_8"
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))  # steps 5-8 trained once, logged once
    assert sorted(r["step"] for r in read_trained_keys(run_dir)) == sorted(list(range(1, 9)) * 2)  # per rank once
    assert not partial.exists()  # the stale half checkpoint was cleaned up


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_trains_the_tiny_model_with_decreasing_loss(tiny_dataset, tmp_path, stage):
    run_dir = tmp_path / f"zero{stage}"
    torchrun(run_dir, tiny_dataset, f"zero.stage={stage}", "curriculum.stages.0.steps=14",
             "curriculum.stages.0.lr=2e-3", "curriculum.stages.1.steps=1", "tracking.mode=disabled",
             "train.checkpoint_every=100", "tracking.sampling_steps=1")
    losses = [r["loss"] for r in metrics(run_dir)][:14]
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    assert (run_dir / "checkpoints" / "step_15" / "COMPLETE").exists()


def test_zero3_stop_and_resume_is_exact_including_the_ema(tiny_dataset, tmp_path):
    import torch

    straight, interrupted = tmp_path / "z3_straight", tmp_path / "z3_interrupted"
    common = ("zero.stage=3", "tracking.mode=disabled", "train.keep_last=5")
    torchrun(straight, tiny_dataset, *common)
    torchrun(interrupted, tiny_dataset, *common, "train.stop_after_steps=3")
    torchrun(interrupted, tiny_dataset, *common)
    assert [r["loss"] for r in metrics(interrupted)] == [r["loss"] for r in metrics(straight)]
    a = torch.load(straight / "checkpoints" / "step_8" / "ema.pt")
    b = torch.load(interrupted / "checkpoints" / "step_8" / "ema.pt")
    assert a["updates"] == b["updates"] == 8
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


def test_bf16_trains_stops_resumes_exactly_and_samples_in_bf16(tiny_dataset, tmp_path):
    """zero.precision=bf16 on 2 CPU ranks under ZeRO-2: the path a GPU user takes first (issue 18: fp32 latents
    reached the bf16 engine and failed at step 1). Stop, resume, the same losses as a straight run, samples."""
    import torch

    straight, interrupted = tmp_path / "bf16_straight", tmp_path / "bf16_interrupted"
    common = ("zero.precision=bf16", "tracking.mode=disabled")
    torchrun(straight, tiny_dataset, *common)
    first = torchrun(interrupted, tiny_dataset, *common, "train.stop_after_steps=3")
    assert "stopping at step 3" in first.stdout
    second = torchrun(interrupted, tiny_dataset, *common)
    assert "resuming from" in second.stdout and "step_3" in second.stdout
    losses = [r["loss"] for r in metrics(interrupted)]
    assert losses == [r["loss"] for r in metrics(straight)] and all(0 < loss < 10 for loss in losses)
    ema = torch.load(interrupted / "checkpoints" / "step_8" / "ema.pt")
    assert all(w.dtype == torch.float32 for w in ema["weights"].values())  # the EMA stays fp32
    samples = sorted((interrupted / "videos" / "step_8").glob("*.mp4"))
    assert samples and all(p.stat().st_size > 0 for p in samples)


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
    ema = torch.load(run_dir / "checkpoints" / "step_8" / "ema.pt")["weights"]
    reference.load_state_dict(ema)
    shapes, prompts = [BucketShape(8, 32, 32)], ["a red circle moving right on a black background"]
    ae, text = build_autoencoder(cfg.model.autoencoder), text_conditioner(cfg.model)
    args = (prompts, shapes, 3, 3.0, 0, cfg.train.shift_reference_tokens, "cpu")
    assert torch.equal(generate(exported, ae, text, *args)[0], generate(reference, ae, text, *args)[0])
    assert from_yaml((out / "config.yaml").read_text()) == cfg


def test_non_finite_losses_are_skipped_counted_and_abort_the_run_with_a_clear_message(tiny_dataset, tmp_path):
    run_dir = tmp_path / "nan"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
               "experiment=demo", f"data.root={tiny_dataset}", f"train.run_dir={run_dir}", *TINY,
               "curriculum.stages.0.lr=1e30", "curriculum.stages.0.warmup_steps=0", "optim.grad_clip=0",
               "train.max_nonfinite_in_row=3", "tracking.mode=disabled"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert "training stopped: 3 non-finite losses in a row" in result.stderr
    assert "raise NonFiniteLoss" not in result.stderr  # a message, not our traceback (torchrun adds its own)
    rows = metrics(run_dir)
    skipped = [r for r in rows if r["loss"] is None]  # the third aborts the run before it is logged
    assert len(skipped) == 2 and skipped[-1]["nonfinite_steps"] == 2
    assert "step skipped" in result.stdout


def _weights_after_poison(tmp_path, dataset, poisoned: str, stage: int):
    """Two steps at gradient accumulation 2 with the chosen forward passes made non-finite; the final weights."""
    label = poisoned.replace(",", "-") or "clean"
    out, run_dir = tmp_path / f"weights-{label}.pt", tmp_path / f"run-{label}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "tests.integration.nonfinite_run", str(out), poisoned, "experiment=demo", f"data.root={dataset}",
               f"train.run_dir={run_dir}", *TINY, f"zero.stage={stage}", "zero.gradient_accumulation_steps=2",
               "train.stop_after_steps=2",
               "tracking.mode=disabled", "tracking.video_every=0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port())))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import torch

    return torch.load(out), metrics(run_dir)


@pytest.mark.parametrize("stage", [2, 3])  # DeepSpeed's ZeRO-1/2 and ZeRO-3 optimizers each skip on their own
def test_a_non_finite_micro_batch_skips_its_whole_step_and_nothing_leaks_into_the_next(tiny_dataset, tmp_path, stage):
    # Step 1 holds forward passes 0 and 1, step 2 passes 2 and 3. Poisoning pass 1 alone must leave exactly
    # what poisoning both leaves: step 1 skipped whole (micro-batch 0's gradient discarded, not carried into
    # step 2 by a shifted accumulation boundary), step 2 trained on its own two micro-batches.
    import torch

    one, one_rows = _weights_after_poison(tmp_path, tiny_dataset, "1", stage)
    both, _ = _weights_after_poison(tmp_path, tiny_dataset, "0,1", stage)
    clean, _ = _weights_after_poison(tmp_path, tiny_dataset, "", stage)
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
