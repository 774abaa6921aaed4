"""Experiment tracking: RUN/metrics.jsonl, W&B (offline by default), and a console line per log step."""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from train.config import TrackingConfig

log = logging.getLogger("kino")


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def console_line(m: Dict[str, Any], total_steps: int) -> str:
    tokens = m.get("tokens_per_s", 0.0)
    loss = "skipped (non-finite)" if m["loss"] is None else f"{m['loss']:.4f}"
    parts = [f"step {m['step']}/{total_steps}", f"stage {m['stage']}", f"loss {loss}",
             f"lr {m['lr']:.2e}", f"{tokens / 1000:.1f}k tok/s", f"data {100 * m.get('data_wait_frac', 0):.0f}%"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"ETA {_format_duration(m.get('eta_s', float('nan')))}")
    return " | ".join(parts)


class Tracker:
    """Lives on the main rank; other ranks hold a disabled one so calls need no rank checks."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, enabled: bool, experiment: str, total_steps: int):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.experiment = experiment
        self.total_steps = total_steps
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.run_id: Optional[str] = None
        self._wandb = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, config: Dict[str, Any], resume_step: Optional[int]) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_metrics(resume_step)
        if self.cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run_id = self.run_id or uuid.uuid4().hex[:8]
        self._wandb = wandb.init(project=self.cfg.project, entity=self.cfg.entity, name=self.experiment,
                                 id=self.run_id, resume="allow", mode=self.cfg.mode, dir=str(self.run_dir),
                                 config=config)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    @property
    def wandb_dir(self) -> Optional[str]:
        return self._wandb.dir if self._wandb is not None else None

    # -- logging -----------------------------------------------------------------------------
    def log(self, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(metrics, sort_keys=True) + "\n")
        log.info(console_line(metrics, self.total_steps))
        if self._wandb is not None:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
            self._wandb.log(scalars, step=metrics["step"])

    def log_videos(self, step: int, videos: List[Path], captions: List[str]) -> None:
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({"samples": [wandb.Video(str(p), caption=c) for p, c in zip(videos, captions)]}, step=step)

    def log_event(self, step: int, text: str) -> None:
        if self.enabled:
            log.info(text)

    def _truncate_metrics(self, step: int) -> None:
        from train.provenance import truncate_after

        truncate_after(self.metrics_path, step)

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"wandb_run_id": self.run_id}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.run_id = state.get("wandb_run_id")
