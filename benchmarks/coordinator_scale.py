"""The data coordinator's core at scale, in-process (no Ray), against the core before issue 28 (the baseline,
benchmarks/baselines/coordinator_v1.py) in the same run.

For each size (samples in shards of 1,000, chunks of 100 samples) and number of consumers, a fresh process builds
the core and measures, on one core of this machine:
  first deal   every consumer's first request (the epoch's plan dealt over the consumers)
  step         one optimizer step: every consumer acknowledges 4 samples of its chunk (one call each)
  re-deal      a resize to half the consumers: their first requests (the open epoch dealt anew)
  state        state() as JSON at 10%, 50% and 99% of an epoch: its size, and the time to make and write it
  peak RSS     of the process (the core and its plan)
Up to 10M samples Kino's epoch is advanced through request and ack as training does; above, acknowledging
hundreds of millions of samples one by one in Python would take hours, so whole chunks are marked finished in the
epoch's bitmap directly (what acknowledging all their samples does), and the consumers' chunks stay in flight: the
state then holds what it would at that point. The baseline's epoch is advanced the same way (its acks scan every
lease: driving it through them takes hours at 2,048 consumers), and it is given up after --baseline-timeout s.

    python benchmarks/coordinator_scale.py                       # the table in BENCHMARKS.md
    python benchmarks/coordinator_scale.py --sizes 1e6 --consumers 64 --baseline-timeout 0   # a quick look
    python benchmarks/coordinator_scale.py --ray --sizes 1e8 --consumers 64 2048 16384       # through Ray

--ray measures the same core as the named Ray actor training uses (data/coordinator.py start_ray_coordinator, a
private local head), the consumers simulated by this process: all their calls of a phase in flight at once, as
thousands of ranks would send them, timed until the last answer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARD_SAMPLES, CHUNK_SAMPLES, ACKS_PER_STEP = 1000, 100, 4


def load_core(which: str):
    sys.path.insert(0, str(REPO))
    if which == "baseline":
        sys.path.insert(0, str(REPO / "benchmarks" / "baselines"))
        from coordinator_v1 import CoordinatorCore
    else:
        from data.coordinator import CoordinatorCore
    return CoordinatorCore


def measure(which: str, samples: int, consumers: int) -> dict:
    CoordinatorCore = load_core(which)
    shards = [(f"shard-{i:07d}.tar", SHARD_SAMPLES) for i in range(samples // SHARD_SAMPLES)]
    out = {"core": which, "samples": samples, "consumers": consumers}
    started = time.perf_counter()
    core = CoordinatorCore(shards, seed=0, chunk_samples=CHUNK_SAMPLES)
    out["build_s"] = time.perf_counter() - started
    report = lambda: print(json.dumps(out), flush=True)  # noqa: E731 - each phase as it ends: a killed run keeps them
    names = [f"rank{c}" for c in range(consumers)]
    started = time.perf_counter()
    leases = [core.request(name, slot, consumers) for slot, name in enumerate(names)]
    out["first_deal_s"] = time.perf_counter() - started
    report()
    cursor = [0] * consumers

    def step() -> float:
        """One step of every consumer; the coordinator's time only (the consumers' tags are made before)."""
        batches = []
        for c in range(consumers):
            lease = leases[c]
            begin = lease["start"] + cursor[c]
            batches.append([(lease["epoch"], lease["chunk"], o)
                            for o in range(begin, min(begin + ACKS_PER_STEP, lease["stop"]))])
            cursor[c] += len(batches[-1])
        began = time.perf_counter()
        for c, name in enumerate(names):
            core.ack(batches[c], name)
            if cursor[c] >= leases[c]["stop"] - leases[c]["start"]:
                leases[c], cursor[c] = core.request(name, c, consumers), 0
        return time.perf_counter() - began

    out["step_s"] = min(step() for _ in range(3))
    report()
    chunks = samples // CHUNK_SAMPLES
    for share in (0.10, 0.50, 0.99):
        advance(core, which, share, chunks, step, consumers)
        began = time.perf_counter()
        text = json.dumps(core.state())
        out[f"state_{int(share * 100)}_s"] = time.perf_counter() - began
        out[f"state_{int(share * 100)}_mb"] = len(text) / 1e6
        report()
    half = max(1, consumers // 2)
    began = time.perf_counter()
    for slot in range(half):
        core.release(names[slot], dead=False)
        core.request(names[slot], slot, half)
    out["redeal_s"] = time.perf_counter() - began
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure_ray(samples: int, consumers: int) -> dict:
    """First deal, one step of acknowledgements (one ack_step per consumer) and state(), through the actor."""
    sys.path.insert(0, str(REPO))
    import ray

    from data.coordinator import start_ray_coordinator

    shards = [(f"shard-{i:07d}.tar", SHARD_SAMPLES) for i in range(samples // SHARD_SAMPLES)]
    out = {"core": "kino via Ray", "samples": samples, "consumers": consumers}
    client = start_ray_coordinator(shards, 0, CHUNK_SAMPLES, "coordinator-scale", "kino-bench",
                                   object_store_bytes=512 * 2 ** 20)
    actor = client._actor
    names = [f"rank{c}" for c in range(consumers)]
    began = time.perf_counter()
    leases = ray.get([actor.request.remote(name, slot, consumers) for slot, name in enumerate(names)])
    out["first_deal_s"] = time.perf_counter() - began
    steps = []
    for n in range(3):
        calls = [{name: [(lease["epoch"], lease["chunk"], lease["start"] + 4 * n + k) for k in range(4)]}
                 for name, lease in zip(names, leases)]
        began = time.perf_counter()
        ray.get([actor.ack_step.remote(call) for call in calls])
        steps.append(time.perf_counter() - began)
    out["step_s"] = min(steps)
    began = time.perf_counter()
    text = json.dumps(ray.get(actor.state.remote()))
    out["state_10_s"] = time.perf_counter() - began  # at the epoch's start; the in-process rows give the rest
    out["state_10_mb"] = len(text) / 1e6
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process, not the actor
    ray.shutdown()
    return out


def advance(core, which: str, share: float, chunks: int, step, consumers: int) -> None:
    """Bring the open epoch to `share` finished: through acks while that is cheap, else by marking chunks done."""
    import numpy as np

    target = min(int(share * chunks), chunks - 2 * consumers)  # the chunks in flight stay in flight
    if which == "kino" and chunks * CHUNK_SAMPLES <= 10_000_000:
        while finished_chunks(core, which) < target:
            step()
        return
    epoch = core.epochs[min(core.epochs)]
    leased = {chunk for (e, chunk) in core.leases if e == epoch.epoch}
    if which == "baseline":  # its state records every offset of a finished chunk
        for chunk in epoch.order:
            if finished_chunks(core, which) >= target:
                break
            if chunk not in leased and chunk not in epoch.done:
                c = core.chunks[chunk]
                epoch.done[chunk] = set(range(c.start, c.stop))
        return
    open_mask = ~epoch.finished
    if leased:
        open_mask[np.fromiter(leased, dtype=np.int64)] = False
    candidates = epoch.order[open_mask[epoch.order]]
    need = max(0, target - epoch.finished_count)
    epoch.finished[candidates[:need]] = True
    epoch.finished_count = int(epoch.finished.sum())


def finished_chunks(core, which: str) -> int:
    epoch = core.epochs[min(core.epochs)]
    if which == "baseline":
        return sum(len(s) >= CHUNK_SAMPLES for s in epoch.done.values())
    return epoch.finished_count


def run_one(which: str, samples: int, consumers: int, timeout: float) -> dict:
    if timeout <= 0:
        return {"core": which, "samples": samples, "consumers": consumers, "skipped": True}
    command = [sys.executable, __file__, "--one", which, str(samples), str(consumers)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired as stopped:
        lines = (stopped.stdout or b"").decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        partial = json.loads(lines.strip().splitlines()[-1]) if lines.strip() else {
            "core": which, "samples": samples, "consumers": consumers}
        return dict(partial, timeout_s=timeout)
    if done.returncode != 0:
        return {"core": which, "samples": samples, "consumers": consumers, "error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8, 1e9])
    parser.add_argument("--consumers", nargs="+", type=int, default=[64, 2048, 16384])
    parser.add_argument("--baseline-timeout", type=float, default=240.0)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--ray", action="store_true", help="through the Ray actor instead (no baseline)")
    parser.add_argument("--one", nargs=3, metavar=("CORE", "SAMPLES", "CONSUMERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        which, samples, consumers = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure_ray(samples, consumers) if which == "ray" else measure(which, samples, consumers)))
        return
    rows = []
    baseline_gave_up = set()
    for samples in (int(s) for s in args.sizes):
        for consumers in args.consumers:
            for which in (("ray",) if args.ray else ("kino", "baseline")):
                if which == "baseline" and (samples in baseline_gave_up or any(s < samples for s in baseline_gave_up)):
                    rows.append({"core": which, "samples": samples, "consumers": consumers, "skipped": True})
                else:
                    rows.append(run_one(which, samples, consumers,
                                        args.baseline_timeout if which == "baseline" else args.timeout))
                    if "timeout_s" in rows[-1] and "first_deal_s" not in rows[-1]:
                        baseline_gave_up.add(samples)
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; chunks of {CHUNK_SAMPLES} samples, shards of "
          f"{SHARD_SAMPLES}")
    print("| core | samples | consumers | first deal s | step ms | re-deal s | state 10/50/99% MB | state 99% s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    def cell(r, key, scale=1.0, digits=2):
        return f"{scale * r[key]:.{digits}f}" if key in r else "-"

    for r in rows:
        if r.get("skipped") or "error" in r:
            print(f"| {r['core']} | {r['samples']:.0e} | {r['consumers']} | {'not run' if r.get('skipped') else 'error'}"
                  f" | | | | | |")
            continue
        killed = f" (killed at {r['timeout_s']:.0f} s)" if "timeout_s" in r else ""
        first = cell(r, "first_deal_s") if "first_deal_s" in r else f"> {r['timeout_s']:.0f}"
        print(f"| {r['core']}{killed} | {r['samples']:.0e} | {r['consumers']} | {first} | "
              f"{cell(r, 'step_s', 1000, 1)} | {cell(r, 'redeal_s')} | {cell(r, 'state_10_mb')} / "
              f"{cell(r, 'state_50_mb')} / {cell(r, 'state_99_mb')} | {cell(r, 'state_99_s')} | "
              f"{cell(r, 'peak_rss_mb', 1, 0)} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
