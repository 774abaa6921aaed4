"""Experiment tracking: RUN/metrics.jsonl, W&B (offline by default), and a console line per log step."""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from data.batch import PackedBatch

from train.config import TrackingConfig

log = logging.getLogger("kino")


@dataclass
class StepResult:
    """What a method's `forward_backward_step` reports for one micro-batch. The tensors stay where they were
    computed (the device): nothing is read back to the host until a log step asks for metrics."""

    finite: torch.Tensor  # (1,) bool: finite on every rank; a step with any non-finite micro-batch is skipped whole
    tokens: int
    loss_sum: Union[torch.Tensor, float] = 0.0  # the loss summed over `tokens` (metrics divide by all ranks' tokens)
    flops: float = 0.0  # model FLOPs of forward and backward, for MFU (0: not counted)
    per_sample_loss: Optional[torch.Tensor] = None  # per clip: loss by timestep and by bucket
    timesteps: Optional[torch.Tensor] = None  # per clip, in [0, 1]
    # The tokens the loss counts, where not all of them (a conditioning frame's are given, not generated).
    loss_tokens: Union[torch.Tensor, float, None] = None


@dataclass
class StepOutcome:
    """One optimizer step: each micro-batch's result and batch, and the time spent waiting for data."""

    results: List[StepResult]
    batches: List[PackedBatch]
    data_time: float
    trained: bool  # every micro-batch was finite: the optimizer step was taken


@dataclass
class StepTotals:
    """An outcome's sums over every rank (the trainer reduces them; a collective)."""

    loss_sum: float
    tokens: float
    flops: float
    data_time: float
    loss_tokens: Optional[float] = None  # the tokens `loss_sum` is over; None: all `tokens`

    @classmethod
    def local(cls, outcome: StepOutcome) -> "StepTotals":
        # A skipped step trained nothing: it reports no loss, tokens or FLOPs.
        results = outcome.results if outcome.trained else []
        return cls(float(sum(r.loss_sum for r in results)), sum(r.tokens for r in results),
                   sum(r.flops for r in results), outcome.data_time,
                   float(sum(r.tokens if r.loss_tokens is None else r.loss_tokens for r in results)))


def step_metrics(outcome: StepOutcome, totals: StepTotals, *, step: int, stage: str, token_budget: int, lr: float,
                 step_time: float, world_size: int, accumulation: int, peak_flops: Optional[float],
                 grad_norm: Optional[float], nonfinite_total: int, eta_s: float,
                 dropped: Dict[str, int], data_parallel: Optional[int] = None) -> Dict[str, Any]:
    """The metrics row of one step (pure: every cross-rank sum is in `totals`). `world_size` counts ranks (for
    MFU and data wait), `data_parallel` the groups that each train their own micro-batches (sequence parallelism
    puts several ranks in one; default: one rank each)."""
    data_parallel = world_size if data_parallel is None else data_parallel
    tokens = totals.tokens
    counted = tokens if totals.loss_tokens is None else totals.loss_tokens
    metrics = {
        "step": step, "stage": stage, "loss": totals.loss_sum / counted if counted else None,  # None: skipped
        "lr": lr, "tokens_per_s": tokens / step_time,
        "samples_per_s": sum(len(b.clips) for b in outcome.batches) * data_parallel / step_time,
        "step_time_s": step_time,
        # packed batches carry no padding; this is the share of the token budget left empty
        "budget_unused_frac": 1 - tokens / (token_budget * data_parallel * accumulation),
        "data_wait_frac": min(1.0, totals.data_time / world_size / step_time),
        "mfu": totals.flops / (step_time * peak_flops * world_size) if peak_flops and totals.flops else None,
        "grad_norm": grad_norm, "nonfinite_steps": nonfinite_total, "eta_s": eta_s, "dropped": dict(dropped),
    }
    by_time, by_bucket = defaultdict(list), defaultdict(list)
    for result, batch in zip(outcome.results if outcome.trained else [], outcome.batches):
        if result.per_sample_loss is None or result.timesteps is None:
            continue
        for loss, t, video in zip(result.per_sample_loss.tolist(), result.timesteps.tolist(), batch.videos):
            by_time[min(3, int(t * 4))].append(loss)
            by_bucket["x".join(map(str, video.shape[:3]))].append(loss)
    metrics.update({f"loss_t{b}": sum(v) / len(v) for b, v in sorted(by_time.items())})
    metrics.update({f"loss_bucket/{k}": sum(v) / len(v) for k, v in sorted(by_bucket.items())})
    return metrics


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


def wandb_credentials_problem(cfg: TrackingConfig) -> Optional[str]:
    """Why tracking.mode=online cannot log in from this machine (None: it can, or the mode needs no account).
    The places wandb itself reads a key from: WANDB_API_KEY, an identity token file, its settings file, and the
    netrc entry `wandb login` writes for the API host. Whether the key is valid only the server can say."""
    if cfg.mode != "online":
        return None
    env = os.environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    import configparser
    import netrc
    from urllib.parse import urlparse

    settings = Path(env.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(settings)
        if parser.get("default", "api_key", fallback=None):
            return None
    except configparser.Error:
        pass
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    for path in ([env["NETRC"]] if env.get("NETRC") else [Path.home() / ".netrc", Path.home() / "_netrc"]):
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if entry and entry[2]:
            return None
    return ("tracking.mode=online needs a W&B login on this machine and none was found: run `wandb login` (or set "
            "WANDB_API_KEY), or train with tracking.mode=offline and `wandb sync` the run's wandb/ folder later")


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
            self._to_wandb(self._wandb.finish)
            self._wandb = None

    def _to_wandb(self, call, *args, **kwargs) -> None:
        """W&B's service is a process of its own: a stop signal to every process (a preemption) can end it before
        the run's last steps and checkpoint. Then W&B is dropped for the rest of the run, with a warning;
        metrics.jsonl, the record resumes rely on, keeps every step."""
        try:
            call(*args, **kwargs)
        except Exception as error:  # the service is gone: a connection error of some kind
            log.warning("W&B stopped answering (%s: %s): the rest of this run logs to metrics.jsonl only",
                        type(error).__name__, str(error)[:120])
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
            self._to_wandb(self._wandb.log, scalars, step=metrics["step"])

    def log_videos(self, step: int, videos: List[Path], captions: List[str]) -> None:
        if self._wandb is None:
            return
        import wandb

        self._to_wandb(self._wandb.log, {"videos": [wandb.Video(str(p), caption=c) for p, c in zip(videos, captions)]},
                       step=step)

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
