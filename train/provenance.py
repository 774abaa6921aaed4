"""Per-step record of the samples each rank trained on: RUN/provenance/rank_R.jsonl."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step`: those steps were not checkpointed and will be trained again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class ProvenanceLog:
    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "provenance" / f"rank_{rank}.jsonl"

    def resume(self, step: int) -> None:
        if self.enabled:
            truncate_after(self.path, step)

    def record(self, step: int, batch: Dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "keys": batch.keys, "shards": batch.shards,
                  "licenses": [m.get("license") for m in batch.meta]}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_trained_keys(run_dir) -> Iterator[Dict]:
    """Every provenance record of a run, all ranks."""
    for path in sorted((Path(run_dir) / "provenance").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)

