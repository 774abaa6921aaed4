"""tests/exactly_once.py, the suite's check of "every sample of an epoch exactly once", on hand-made provenance: it
passes a clean record and fails on a repeated sample, on a finished epoch with a sample missing, and on a tag
outside the data plan."""
import json

import pytest

from conf.schema import load_config, to_yaml
from data.coordinator import make_chunks
from data.loader import dataset_rows
from tests.exactly_once import assert_exactly_once


def fake_run(tmp_path, dataset, records, open_epochs):
    run_dir = tmp_path / "run"
    (run_dir / "provenance").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(load_config(["experiment=demo", f"data.root={dataset}",
                                                              "data.chunk_samples=2"], check=False)))
    (run_dir / "provenance" / "rank_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoint = run_dir / "checkpoints" / "step_9"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("9\n")
    (run_dir / "checkpoints" / "latest").write_text("step_9\n")
    (checkpoint / "train_state.json").write_text(json.dumps({"step": 9, "data": {"epochs": {
        str(e): {} for e in open_epochs}}}))
    return run_dir


def record(step, trained, dropped=()):
    return {"step": step, "keys": [f"k{t}" for t in trained], "tags": [list(t) for t in trained],
            "dropped": [[*t, "license_missing"] for t in dropped]}


@pytest.fixture
def plan(tiny_dataset):
    chunks = make_chunks(dataset_rows(tiny_dataset), 2)
    return [(c.id, offset) for c in chunks for offset in range(c.start, c.stop)]


def epoch_records(epoch, samples, start_step=1):
    half = len(samples) // 2
    return [record(start_step, [(epoch, *s) for s in samples[:half][1:]], dropped=[(epoch, *samples[0])]),
            record(start_step + 1, [(epoch, *s) for s in samples[half:]])]


def test_a_clean_record_passes_and_counts_its_finished_epoch(tmp_path, tiny_dataset, plan):
    records = epoch_records(0, plan) + [record(3, [(1, *plan[0])])]
    epochs = assert_exactly_once(fake_run(tmp_path, tiny_dataset, records, open_epochs=[1]), min_finished_epochs=1)
    assert epochs[0].finished and not epochs[1].finished and sum(epochs[0].seen.values()) == len(plan)


def test_a_sample_trained_twice_fails(tmp_path, tiny_dataset, plan):
    records = epoch_records(0, plan) + [record(3, [(0, *plan[-1])])]
    with pytest.raises(AssertionError, match="epoch 0: 1 sample\\(s\\) trained or dropped more than once"):
        assert_exactly_once(fake_run(tmp_path, tiny_dataset, records, open_epochs=[1]))


def test_a_finished_epoch_missing_a_sample_fails(tmp_path, tiny_dataset, plan):
    records = epoch_records(0, plan[:-1])
    with pytest.raises(AssertionError, match="epoch 0 is finished, yet 1 of its"):
        assert_exactly_once(fake_run(tmp_path, tiny_dataset, records, open_epochs=[1]))
    assert_exactly_once(fake_run(tmp_path / "open", tiny_dataset, records, open_epochs=[0]))  # still open: fine


def test_a_tag_outside_the_plan_fails(tmp_path, tiny_dataset, plan):
    with pytest.raises(AssertionError, match="outside the data plan"):
        assert_exactly_once(fake_run(tmp_path, tiny_dataset, [record(1, [(0, 999, 0)])], open_epochs=[0]))


def test_epochs_in_step_passes_overlap_by_one_and_fails_a_clip_two_epochs_ahead(tmp_path, tiny_dataset, plan):
    """assert_epochs_in_step (data.strict_epochs): epoch 1 may start while epoch 0 finishes (counts 1 and 0 side by
    side); a clip trained for epoch 1 and again for epoch 2 while another still waits for epoch 0 is two apart."""
    from tests.exactly_once import assert_epochs_in_step

    first, rest = plan[:2], plan[2:]
    in_step = [record(1, [(0, *s) for s in first]), record(2, [(0, *s) for s in rest] + [(1, *first[0])])]
    assert_epochs_in_step(fake_run(tmp_path, tiny_dataset, in_step, open_epochs=[1]))
    ahead = [record(1, [(0, *s) for s in first]), record(2, [(1, *first[0])]), record(3, [(2, *first[0])]),
             record(4, [(0, *s) for s in rest])]
    with pytest.raises(AssertionError, match="after step 3 some clip had trained 3 times more often"):
        assert_epochs_in_step(fake_run(tmp_path / "ahead", tiny_dataset, ahead, open_epochs=[1]))
