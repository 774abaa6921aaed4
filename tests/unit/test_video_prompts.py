"""tracking.video_prompts=[]: no videos, not even at the end of a run (it crashed there, dividing by no prompts in
generation_plan); with video_every > 0 it is refused before the run starts."""
from types import SimpleNamespace

import pytest

from conf.errors import ConfigError
from conf.schema import load_config
from data.buckets import BucketShape
from train.generate import generation_plan
from train.trainer import Trainer


def test_no_prompts_plan_no_videos_and_some_prompts_cycle_over_the_buckets():
    shapes = [BucketShape(8, 32, 32), BucketShape(8, 32, 48), BucketShape(4, 32, 32)]
    assert generation_plan([], shapes) == ([], [])
    prompts, plan = generation_plan(["a red circle"], shapes)
    assert prompts == ["a red circle"] * 2 and sorted((s.width, s.frames) for s in plan) == [(32, 8), (48, 8)]


def test_the_end_of_a_run_without_video_prompts_assembles_no_model_and_writes_no_videos(tmp_path):
    cfg = load_config(["experiment=demo", "tracking.video_prompts=[]"])
    assert cfg.tracking.video_prompts == []

    def assembled():
        raise AssertionError("the EMA model is assembled for no videos")

    trainer = SimpleNamespace(cfg=cfg, ema_model=assembled, run_dir=tmp_path)
    assert Trainer.generate_videos(trainer) == [] and not (tmp_path / "videos").exists()


def test_videos_every_n_steps_without_prompts_are_refused():
    with pytest.raises(ConfigError, match=r"tracking.video_every=5 asks for videos, and tracking.video_prompts is "
                                          r"empty: give prompts, or set tracking.video_every=0"):
        load_config(["experiment=demo", "tracking.video_prompts=[]", "tracking.video_every=5"])
    assert load_config(["experiment=demo", "tracking.video_every=5"]).tracking.video_prompts  # the default prompt
