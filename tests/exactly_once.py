"""The suite's one check of Kino's data promise: every sample of an epoch reaches the model (or is dropped for a
reason) exactly once, across restarts, kills, world sizes, sequence-parallel degrees and sources.

It reads only what a run leaves behind: each rank's provenance (train/provenance.py: the (epoch, chunk, offset) tag
of every sample trained, and of every sample dropped, per step), the run's config.yaml (the data plan: the shards
and data.chunk_samples), and the latest checkpoint's data plan (which epochs are still open). A resume truncates
provenance to its checkpoint's step, so what the files hold is what the final model trained on.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

Sample = Tuple[int, int]  # (chunk id, offset within the shard)


@dataclass
class EpochCounts:
    """What the run's provenance says of one epoch."""

    epoch: int
    finished: bool
    trained: Counter  # (chunk, offset) -> times it reached the model
    dropped: Counter  # (chunk, offset) -> times it was dropped (license, decode, non-finite step, ...)

    @property
    def seen(self) -> Counter:
        return self.trained + self.dropped


def _plan_samples(run_dir: Path) -> Set[Sample]:
    from conf.schema import from_yaml
    from data.coordinator import make_chunks
    from data.latent_cache import run_roots
    from data.loader import dataset_rows

    cfg = from_yaml((run_dir / "config.yaml").read_text())
    chunks = make_chunks(dataset_rows(run_roots(cfg)[0]), cfg.data.chunk_samples)
    return {(chunk.id, offset) for chunk in chunks for offset in range(chunk.start, chunk.stop)}


def _open_epochs(run_dir: Path) -> Optional[List[int]]:
    """The epochs the latest complete checkpoint's data plan holds open (None without a checkpoint)."""
    from train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        return None
    plan_file = latest / "data_plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else \
        json.loads((latest / "train_state.json").read_text())["data"]
    return sorted(int(epoch) for epoch in plan["epochs"])


def provenance_records(run_dir: Path) -> Iterable[Dict]:
    from train.provenance import read_trained_keys

    for record in read_trained_keys(run_dir):
        assert "tags" in record and "dropped" in record, f"a provenance record without sample tags: {record}"
        yield record


def epoch_counts(run_dir) -> Dict[int, EpochCounts]:
    run_dir = Path(run_dir)
    open_epochs = _open_epochs(run_dir)
    first_open = open_epochs[0] if open_epochs else None
    epochs: Dict[int, EpochCounts] = {}

    def counts(epoch: int) -> EpochCounts:
        if epoch not in epochs:
            epochs[epoch] = EpochCounts(epoch, first_open is not None and epoch < first_open, Counter(), Counter())
        return epochs[epoch]

    for record in provenance_records(run_dir):
        assert len(record["tags"]) == len(record["keys"]), record
        for epoch, chunk, offset in record["tags"]:
            counts(epoch).trained[(chunk, offset)] += 1
        for epoch, chunk, offset, _reason in record["dropped"]:
            counts(epoch).dropped[(chunk, offset)] += 1
    if first_open is not None:  # an epoch that closed although nothing of it was recorded would be a loss too
        for epoch in range(first_open):
            counts(epoch)
    return epochs


def assert_exactly_once(run_dir, min_finished_epochs: int = 0) -> Dict[int, EpochCounts]:
    """Every sample of each finished epoch trained or dropped exactly once; in an open epoch at most once; no tag
    outside the data plan. Returns the counts, for a test's own further checks."""
    run_dir = Path(run_dir)
    plan = _plan_samples(run_dir)
    epochs = epoch_counts(run_dir)
    assert epochs, f"{run_dir}: no provenance recorded"
    for epoch in sorted(epochs):
        counts = epochs[epoch]
        seen = counts.seen
        unknown = set(seen) - plan
        assert not unknown, f"epoch {epoch}: samples outside the data plan: {sorted(unknown)[:5]}"
        repeated = sorted(sample for sample, n in seen.items() if n > 1)
        assert not repeated, (f"epoch {epoch}: {len(repeated)} sample(s) trained or dropped more than once, "
                              f"e.g. (chunk, offset) {repeated[:5]}")
        if counts.finished:
            missing = sorted(plan - set(seen))
            assert not missing, (f"epoch {epoch} is finished, yet {len(missing)} of its {len(plan)} samples never "
                                 f"reached the model nor were dropped, e.g. (chunk, offset) {missing[:5]}")
    finished = sum(c.finished for c in epochs.values())
    assert finished >= min_finished_epochs, f"{finished} finished epoch(s), expected at least {min_finished_epochs}"
    return epochs


def training_spread(run_dir) -> Tuple[int, int]:
    """(widest spread after any step, the step it came at): how far apart the training counts of the run's clips
    drifted, over every sample the run trained at least once (a sample dropped every epoch never trains). Ranks'
    records of one step count together."""
    from collections import defaultdict

    by_step = defaultdict(list)
    for record in provenance_records(Path(run_dir)):
        by_step[record["step"]].append(record)
    trained = Counter()
    history = []
    for step in sorted(by_step):
        for record in by_step[step]:
            trained.update((chunk, offset) for _, chunk, offset in record["tags"])
        history.append((step, Counter(trained)))
    clips = set(trained)
    worst, at = 0, 0
    for step, counts in history:
        spread = max(counts[c] for c in clips) - min(counts[c] for c in clips)
        if spread > worst:
            worst, at = spread, step
    return worst, at


def assert_epochs_in_step(run_dir) -> None:
    """data.strict_epochs: after every step, every clip's training count is within one of every other's."""
    worst, step = training_spread(run_dir)
    assert worst <= 1, (f"{run_dir}: after step {step} some clip had trained {worst} times more often than another "
                        f"(data.strict_epochs promises within one)")
