"""How evenly a real run trains its clips: the 2-rank demo recipe over a small dataset, and how far apart the clips'
training counts drift, with and without kills and a resize.

Each scenario is a real `torchrun -m train` (experiment=demo, 2 CPU ranks, ZeRO-2, the demo's packing curriculum)
over 24 procedural clips (and the demo set's 5 bad samples, dropped every epoch) in chunks of 2, for --steps
optimizer steps (two thirds in the main stage, a third in the anneal), checkpointing every 10:
  straight      one run
  kills         three kill -9 of the last rank along the way (at steps 25, 55 and 85), each followed by a resume
  kills+resize  as `kills`, with the second resume on 1 rank (its one rank killed) and the third back on 2
After each scenario it reads what the final model trained on (each rank's provenance, truncated by every resume to
its checkpoint) and reports: over the clips the run trained, the least and most times any was trained at the end and
the widest spread of those counts after any step (data.strict_epochs promises at most one); the clips trained in all
and the mean share of the token budget left empty a step (what the epoch barrier costs: underfilled batches at an
epoch's end, batches held for a later step); and over every sample of the data (a dropped one counts as seen, as
the coordinator counts it) the same least, most and spread, the counts with the clips the loaders hold at the end
(read, packed or waiting in the packing window: the first a resume trains), and the epochs the last checkpoint holds
open. tests/exactly_once.py checks each run.

    python benchmarks/epoch_balance.py                                 # the table in BENCHMARKS.md
    python benchmarks/epoch_balance.py --set data.strict_epochs=false   # the baseline: epochs overlap freely
    python benchmarks/epoch_balance.py --scenarios straight --set data.work_stealing=true
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KILL_STEPS = (25, 55, 85)
QUIET = ["tracking.mode=disabled", "tracking.eval_prompts=0", "tracking.eval_clips=0", "data.validation_root=null",
         "train.checkpoint_every=10", "train.keep_last=2", "tracking.log_every=1"]


def build_dataset(root: Path, clips: int) -> Path:
    from data.demo_set import build

    if not (root / "manifest.json").exists():
        build(root, procedural=clips, real=False, samples_per_shard=4, seed=0)
    return root


def command(run_dir: Path, data: Path, steps: int, nproc: int, extra) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "train", "experiment=demo", f"data.root={data}", f"train.run_dir={run_dir}",
            f"curriculum.stages.0.steps={steps * 2 // 3}", f"curriculum.stages.1.steps={steps - steps * 2 // 3}",
            "data.chunk_samples=2", *QUIET, *extra]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def rank_pids(parent: int):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry.name))
    return sorted(pids)


def launch(run_dir: Path, data: Path, steps: int, nproc: int, extra, log, kill_at=None) -> int:
    """One torchrun; with `kill_at`, its last rank is killed with SIGKILL once the run has logged that step."""
    process = subprocess.Popen(command(run_dir, data, steps, nproc, extra), cwd=REPO, stdout=log, stderr=log,
                               env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled"))
    if kill_at is not None:
        while process.poll() is None and last_step(run_dir) < kill_at:
            time.sleep(0.2)
        ranks = rank_pids(process.pid)
        if process.poll() is None and ranks:
            os.kill(ranks[-1], signal.SIGKILL)
            print(f"    kill -9 of rank pid {ranks[-1]} at step {last_step(run_dir)}", flush=True)
    return process.wait(timeout=900)


def balance(run_dir: Path):
    from tests.exactly_once import (_open_epochs, _plan_samples, assert_exactly_once, provenance_records,
                                    training_spread)

    assert_exactly_once(run_dir)
    samples = _plan_samples(run_dir)
    by_step = defaultdict(list)
    for record in provenance_records(run_dir):
        by_step[record["step"]].append(record)
    seen, worst = Counter(), 0
    for step in sorted(by_step):
        for record in by_step[step]:
            seen.update((chunk, offset) for _, chunk, offset in record["tags"])
            seen.update((chunk, offset) for _, chunk, offset, _ in record["dropped"])
        counts = [seen[s] for s in samples]
        worst = max(worst, max(counts) - min(counts))
    counts = [seen[s] for s in samples]
    held = seen + in_flight(run_dir)
    committed = [held[s] for s in samples]
    trained = Counter((chunk, offset) for records in by_step.values() for record in records
                      for _, chunk, offset in record["tags"])
    trained_spread, _ = training_spread(run_dir)
    return {"min": min(counts), "max": max(counts), "worst_spread": worst, "steps": max(by_step),
            "open_epochs": _open_epochs(run_dir), "committed": (min(committed), max(committed)),
            "trained": (min(trained.values()), max(trained.values())), "trained_spread": trained_spread,
            "clips_trained": sum(trained.values()), "budget_unused": budget_unused(run_dir)}


def budget_unused(run_dir: Path) -> float:
    """The mean share of the token budget left empty per step, over the steps the final model trained (the last
    launch's record of a step counts): underfilled batches and batches held for a later step both leave it."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "budget_unused_frac" in row:
            rows[row["step"]] = row["budget_unused_frac"]
    return sum(rows.values()) / len(rows)


def in_flight(run_dir: Path) -> Counter:
    """The clips the last checkpoint's loaders hold (packing window, closed batches not yet trained): read, and
    the first a resume trains."""
    from train.checkpoint import latest_checkpoint

    state = json.loads((latest_checkpoint(run_dir / "checkpoints") / "train_state.json").read_text())
    held = Counter()
    for rank in state["ranks"]:
        for snapshot in (rank.get("loaders") or {}).values():
            entries = snapshot["buffer"] + [e for batch in snapshot["pending"] for e in batch]
            held.update((chunk, offset) for _, chunk, offset, *_ in entries)
    return held


def scenario(name: str, data: Path, work: Path, steps: int, extra) -> dict:
    run_dir = work / name.replace("+", "_")
    log = open(work / f"{run_dir.name}.log", "w")
    started = time.time()
    if name == "straight":
        status = launch(run_dir, data, steps, 2, extra, log)
    else:
        worlds = [2, 2, 1, 2] if name == "kills+resize" else [2, 2, 2, 2]
        for index, kill_at in enumerate([*KILL_STEPS, None]):
            status = launch(run_dir, data, steps, worlds[index], extra, log, kill_at=kill_at)
    log.close()
    if status != 0:
        raise SystemExit(f"{name}: the last launch exited {status}; see {log.name}")
    result = balance(run_dir)
    result.update(scenario=name, seconds=round(time.time() - started))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--clips", type=int, default=24, help="procedural clips (the set also holds 5 bad samples)")
    parser.add_argument("--scenarios", nargs="+", default=["straight", "kills", "kills+resize"])
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="epoch_balance_"))
    work.mkdir(parents=True, exist_ok=True)
    data = build_dataset(work / f"data_{args.clips}", args.clips)
    print(f"runs in {work}; overrides {args.set}")
    print("| scenario | steps | trained, least - most | widest spread of trained counts after any step | clips "
          "trained | budget unused | seen (drops too), least - most | widest spread of seen counts | seen or in the "
          "loaders' windows at the end | open epochs at the end | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.scenarios:
        r = scenario(name, data, work, args.steps, args.set)
        print(f"| {r['scenario']} | {r['steps']} | {r['trained'][0]} - {r['trained'][1]} | {r['trained_spread']} | "
              f"{r['clips_trained']} | {r['budget_unused']:.1%} | {r['min']} - {r['max']} | {r['worst_spread']} | "
              f"{r['committed'][0]} - {r['committed'][1]} | {r['open_epochs']} | {r['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
