"""What a rank pays to learn a dataset's plan at start: the manifest read by the data plane (dataset_rows, then
dataset_fingerprint for the dataset check), inline JSON (version 1, the baseline) against the split form (a header
and a Parquet shard table, version 2), at 10k to 1M shards, each measured in a fresh process (time and peak RSS).

    python benchmarks/manifest_scale.py                     # the table in BENCHMARKS.md
    python benchmarks/manifest_scale.py --shards 10000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from data.loader import dataset_fingerprint, dataset_rows
start = time.perf_counter()
rows = dataset_rows({root!r})
fingerprint = dataset_fingerprint({root!r})
# VmHWM, not ru_maxrss: the latter keeps the peak of the forked parent (the builder) across exec
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"seconds": time.perf_counter() - start, "rows": len(rows), "rss_mb": int(peak) / 1024}}))
"""


def build(root: Path, shards: int, split: bool) -> int:
    from data.schema import write_manifest

    rows = [{"path": f"shard-{i:07d}.tar", "num_samples": 1000, "bytes": 10 ** 9 + i,
             "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "licenses": {"CC-BY-4.0": 1000}}
            for i in range(shards)]
    root.mkdir(parents=True)
    write_manifest(root, {"name": root.name, "shards": rows}, split_above=0 if split else shards)
    return sum(f.stat().st_size for f in root.iterdir())


def measure(root: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE.format(repo=str(REPO), root=str(root))],
                          capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="manifest_scale_"))
    print("| shards | inline: bytes | inline: plan + fingerprint | inline: peak RSS | split: bytes | "
          "split: plan + fingerprint | split: peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for shards in args.shards:
        cells = []
        for split in (False, True):
            root = work / f"{shards}-{'split' if split else 'inline'}"
            size = build(root, shards, split)
            result = measure(root)
            assert result["rows"] == shards
            cells += [f"{size / 1e6:.1f} MB", f"{result['seconds']:.2f} s", f"{result['rss_mb']:.0f} MB"]
        print(f"| {shards:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
