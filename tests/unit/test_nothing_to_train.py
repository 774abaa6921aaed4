"""The trainer stops a stage that can train on nothing (every sample of the data dropped), but not a rank that
only met a run of bad chunks: it counts distinct samples, not drops (one rank reads a share of each epoch, so the
same bad chunk can come back epoch after epoch while good ones go to other ranks)."""
from types import SimpleNamespace

import pytest

from data.batch import Drop, PackedBatch
from train.curriculum import Curriculum
from train.config import CurriculumConfig, StageConfig
from train.sequence_parallel import SequenceLayout
from train.trainer import NothingToTrain, Trainer


def stand_in(batches, samples: int):
    return SimpleNamespace(layout=SequenceLayout(1, 0, 1), curriculum=Curriculum(CurriculumConfig(stages=[StageConfig(
        name="main")])), step=0, _iterator=iter(batches), _iterator_stage=0, dataset_samples=samples,
        cfg=SimpleNamespace(data=SimpleNamespace(root="datasets/x")))


def drops(epoch: int, chunk: int, reason: str = "too_short"):
    return PackedBatch([], [Drop((epoch, chunk, offset), reason, f"k{chunk}-{offset}") for offset in range(4)],
                       "rank0-worker0", None)


def test_a_rank_meeting_the_same_bad_chunk_epoch_after_epoch_goes_on_to_the_good_sample():
    clip = SimpleNamespace()
    good = PackedBatch([clip], [], "rank0-worker0", None)
    # 8 samples in 2 chunks; this rank meets chunk 0 (all bad) in three epochs, 12 drops in a row, then a clip.
    batch = Trainer.data_step(stand_in([drops(0, 0), drops(1, 0), drops(2, 0), good], samples=8))
    assert batch.clips == [clip] and len(batch.dropped) == 12


def test_every_sample_dropped_stops_the_stage_with_the_reasons():
    with pytest.raises(NothingToTrain, match=r"stage 'main' can train on nothing.*too_short=8"):
        Trainer.data_step(stand_in([drops(0, 0), drops(0, 1), drops(1, 0)], samples=8))
