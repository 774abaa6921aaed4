"""Curriculum position and learning-rate schedule: pure functions of the global step."""
from __future__ import annotations

import math
from typing import Any, Dict, List

from data.buckets import stage_shapes  # noqa: F401 (re-exported: data/ computes a stage's buckets too)
from train.config import CurriculumConfig, StageConfig


class Curriculum:
    def __init__(self, cfg: CurriculumConfig):
        self.stages: List[StageConfig] = list(cfg.stages)
        self.boundaries: List[int] = []  # first step of each stage
        start = 0
        for stage in self.stages:
            self.boundaries.append(start)
            start += stage.steps
        self.total_steps = start

    def stage_index(self, step: int) -> int:
        index = 0
        for i, first in enumerate(self.boundaries):
            if step >= first:
                index = i
        return index

    def stage(self, step: int) -> StageConfig:
        return self.stages[self.stage_index(step)]

    def lr(self, step: int) -> float:
        index = self.stage_index(step)
        stage, local = self.stages[index], step - self.boundaries[index]
        if stage.warmup_steps and local < stage.warmup_steps:
            return stage.lr * (local + 1) / stage.warmup_steps
        if stage.schedule == "cosine":
            span = max(1, stage.steps - stage.warmup_steps)
            progress = min(1.0, (local - stage.warmup_steps) / span)
            floor = stage.lr * stage.min_lr_ratio
            return floor + (stage.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return stage.lr

    def state_dict(self, step: int) -> Dict[str, Any]:
        index = self.stage_index(step)
        return {"stage_index": index, "stage": self.stages[index].name,
                "step_in_stage": step - self.boundaries[index]}
