"""`make demo-s3`: the demo with its data in object storage, on a real S3-compatible server (moto) on 127.0.0.1.

It uploads the demo data set (datasets/demo, as `make demo-data` builds it) into a bucket, as a user would with
`aws s3 sync`, then, with only the bucket's URL in the config and the credentials in the environment:
  1. trains the demo (`python -m launch local experiment=demo`) and stops it halfway (train.stop_after_steps);
  2. resumes it to the end, from the bucket;
  3. takes down a rights holder of the real clips (`python -m data takedown s3://... --run`): the bucket's shards
     are rewritten, and the report names the run's checkpoints that used the holder's clips;
  4. checks that every sample trained once per finished epoch (tests/exactly_once.py, before the takedown), that the
     bucket verifies as before (the demo set's planted bad samples, nothing new), and that the secret key is in no
     file of the run directory or the bucket.
SHORT=1 (`--short`) trains 60 steps instead of the demo's 1600. The data lives in the server's memory: each
invocation starts over (train.resume=false).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.s3_server import files_under, local_s3, make_bucket  # noqa: E402

SHORT = ["curriculum.stages.0.steps=40", "curriculum.stages.1.steps=20", "train.checkpoint_every=20",
         "tracking.eval_prompts=4", "tracking.eval_clips=4"]


def run(command, env, check=True) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (result.stdout + result.stderr).strip().splitlines()[-12:]
    print("\n".join("  " + line for line in tail), flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"exit {result.returncode}: {' '.join(command)}\n{result.stderr[-4000:]}")
    return result


def problems(report: str):
    """The verify report's problem lines (kind, shard, key) and its count, without the decoder's wording."""
    return sorted(" ".join(line.split()[:3]) for line in report.splitlines()
                  if line.strip().startswith(("INVALID", "CORRUPT")) or line.strip().endswith("problem(s)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "datasets" / "demo")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "demo-s3")
    parser.add_argument("--short", action="store_true")
    args = parser.parse_args()
    if not (args.data / "manifest.json").exists():
        raise SystemExit(f"{args.data} has no manifest.json: run `make demo-data` first")
    py = sys.executable
    with local_s3(Path(tempfile.mkdtemp(prefix="kino-s3-")) / "moto.log") as credentials:
        env = dict(os.environ, **credentials)
        os.environ.update(credentials)
        bucket = "s3://kino-demo"
        make_bucket(bucket)
        import fsspec

        s3 = fsspec.filesystem("s3", skip_instance_cache=True)
        for path in sorted(args.data.rglob("*")):  # the set and its validation split, not the build cache
            if path.is_file() and ".cache" not in path.relative_to(args.data).parts:
                s3.put_file(str(path), f"kino-demo/demo/{path.relative_to(args.data).as_posix()}")
        dataset = f"{bucket}/demo"
        print(f"uploaded {args.data} to {dataset}", flush=True)
        before = run([py, "-m", "data", "verify", dataset], env, check=False)
        assert before.returncode == 1 and len(problems(before.stdout)) == 4, before.stdout  # 3 planted + the count

        steps = 60 if args.short else 1150 + 450  # conf/curriculum/demo.yaml
        train = [py, "-m", "launch", "local", "experiment=demo", f"data.root={dataset}",
                 f"data.validation_root={dataset}/validation", f"train.run_dir={args.run_dir}",
                 *(SHORT if args.short else [])]
        run([*train, "train.resume=false", f"train.stop_after_steps={steps // 2}"], env)
        resumed = run(train, env)
        assert "resuming from" in resumed.stdout + resumed.stderr, "the second launch did not resume"
        last = args.run_dir / "checkpoints" / f"step_{steps}"
        assert (last / "COMPLETE").exists(), f"{last} is missing"

        from tests.exactly_once import assert_exactly_once

        epochs = assert_exactly_once(args.run_dir)  # against the plan it trained on: before the takedown changes it
        audit = json.loads((last / "audit.json").read_text())
        assert audit["dataset"] == dataset, audit["dataset"]
        totals = {}
        for by_holder in audit["rights_holders"].values():
            for name, count in by_holder.items():
                totals[name] = totals.get(name, 0) + count
        print(f"trained on, by rights holder: {totals}", flush=True)
        # a holder of the real clips (the procedural ones are all the Kino project's)
        holder = min(totals, key=lambda name: (name == "The Kino project", name))
        taken = run([py, "-m", "data", "takedown", dataset, "--rights-holder", holder, "--run", str(args.run_dir)],
                    env)
        assert "removed" in taken.stdout and "step_" in taken.stdout, taken.stdout
        # the demo set holds bad samples on purpose (no license, a corrupt video): the same problems as before the
        # takedown, and no new one
        checked = run([py, "-m", "data", "verify", dataset], env, check=False)
        assert checked.returncode == before.returncode and problems(checked.stdout) == problems(before.stdout), (
            checked.stdout, before.stdout)
        run([py, "-m", "data", "audit", str(args.run_dir), "--rights-holder", holder], env)

        secret = credentials["AWS_SECRET_ACCESS_KEY"].encode()
        leaks = [p for p in args.run_dir.rglob("*") if p.is_file() and secret in p.read_bytes()]
        leaks += [p for p in files_under(bucket) if secret in p.read_bytes()]
        assert not leaks, f"the secret key was written to {leaks[:5]}"
        print(f"\n==== demo on S3: trained {steps} steps (stopped at {steps // 2}, resumed), took down {holder!r}, "
              f"{sum(c.finished for c in epochs.values())} finished epoch(s) exactly once, no secret in "
              f"{args.run_dir} or {bucket} ====")
        print(f"videos: {args.run_dir / 'videos' / f'step_{steps}'}")


if __name__ == "__main__":
    main()
