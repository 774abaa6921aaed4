"""Per-step record of the samples each rank trained on: RUN/provenance/rank_R.jsonl.

One JSON line per optimizer step and reading consumer: the keys, shards and licenses of the samples the step trained,
each sample's place in the data plan as its (epoch, chunk, offset) tag, and the samples it dropped (license gate,
decode errors, a non-finite step), each as [epoch, chunk, offset, reason]. The tags are what lets anyone check the
product's promise from the files alone: every sample of an epoch trained or dropped exactly once."""
import json
import re
from pathlib import Path
from typing import Dict, Iterator

NONFINITE_STEP = "nonfinite_step"  # the drop reason of a step skipped for a non-finite loss


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step`: those steps were not checkpointed and will be trained again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class ProvenanceLog:
    def __init__(self, run_dir: Path, rank: int, enabled: bool, world_size: int = 1):
        self.enabled, self.rank, self.world_size = enabled, rank, world_size
        self.path = Path(run_dir) / "provenance" / f"rank_{rank}.jsonl"

    def resume(self, step: int) -> None:
        """Every rank drops its own records past the checkpoint's step; rank 0 also those of ranks this world does
        not have (a resume on fewer ranks): what they trained after the checkpoint was lost with them."""
        if not self.enabled:
            return
        truncate_after(self.path, step)
        if self.rank == 0:
            for path in self.path.parent.glob("rank_*.jsonl"):
                number = re.fullmatch(r"rank_(\d+)\.jsonl", path.name)
                if number and int(number.group(1)) >= self.world_size:
                    truncate_after(path, step)

    def record(self, step: int, batch, trained: bool = True) -> None:
        """`batch` (a PackedBatch) as settled by `step`: trained, or skipped whole (a non-finite step: its samples
        are recorded as dropped, with that reason)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dropped = [[*d.tag, d.reason] for d in batch.dropped]
        if trained:
            record = {"step": step, "keys": batch.keys, "shards": batch.shards,
                      "licenses": [m.get("license") for m in batch.meta], "tags": [list(t) for t in batch.tags]}
        else:
            record = {"step": step, "keys": [], "shards": [], "licenses": [], "tags": []}
            dropped += [[*tag, NONFINITE_STEP] for tag in batch.tags]
        record["dropped"] = dropped
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_trained_keys(run_dir) -> Iterator[Dict]:
    """Every provenance record of a run, all ranks."""
    for path in sorted((Path(run_dir) / "provenance").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)

