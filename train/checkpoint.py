"""Atomic, resumable checkpoints: RUN/checkpoints/step_N/ (docs/architecture.md, "Contracts").

A checkpoint is written under a temporary name, completed with a COMPLETE marker,
renamed into place, and only then named by `latest`; a crash at any point leaves
`latest` on the previous complete checkpoint.
  step_N/engine/          DeepSpeed engine (sharded under ZeRO)
  step_N/train_state.json step, stage, data positions, RNG of every rank, tracker id, config hash
  step_N/audit.json       what was trained on, per shard and license; what was dropped and why
  step_N/ema.pt           EMA weights (fp32)
  step_N/config.yaml      the resolved config of the run
  step_N/COMPLETE
  step_N/latest, zero_to_fp32.py   DeepSpeed's: `python zero_to_fp32.py . out` consolidates the raw weights
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

ENGINE_TAG = "engine"
UNIVERSAL_TAG = "engine_universal"
COMPLETE = "COMPLETE"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root) -> Optional[Path]:
    """The checkpoint `latest` names, if complete; else the newest complete one (a crash between the
    rename and the `latest` update leaves a newer complete checkpoint that is safe to use)."""
    root = Path(root)
    named = root / LATEST
    candidates = complete_checkpoints(root)
    if named.exists():
        target = root / named.read_text().strip()
        if (target / COMPLETE).exists() and (not candidates or candidates[-1] == target):
            return target
    return candidates[-1] if candidates else None


class CheckpointManager:
    def __init__(self, root, rank: int, keep_last: int):
        self.root = Path(root)
        self.rank = rank
        self.keep_last = keep_last

    def save(self, step: int, engine, train_state: Dict[str, Any], per_rank_state: Dict[str, Any],
             files: Dict[str, Callable[[Path], None]]) -> Path:
        """Collective: every rank calls it. `files` maps a file name to a writer run on rank 0."""
        final = self.root / f"step_{step}"
        partial = self.root / f".partial_step_{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        # save_latest writes step_N/latest naming the engine tag: the zero_to_fp32.py DeepSpeed copies into
        # step_N/ then works as DeepSpeed users run it (`python zero_to_fp32.py . out`), without --tag.
        engine.save_checkpoint(str(partial), tag=ENGINE_TAG, save_latest=True)
        ranks = _gather(per_rank_state)
        if self.rank == 0:
            state = dict(train_state, step=step, ranks=ranks, saved_at=time.time())
            _atomic_write(partial / "train_state.json", json.dumps(state, indent=1, sort_keys=True))
            for name, write in files.items():
                write(partial / name)
        _barrier()
        if self.rank == 0:
            _atomic_write(partial / COMPLETE, f"{step}\n")
            _fsync_dir(partial)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            _atomic_write(self.root / LATEST, final.name + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".partial_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, engine, universal: bool = False) -> Dict[str, Any]:
        tag = UNIVERSAL_TAG if universal else ENGINE_TAG
        load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the engine state from {path / tag}")
        return json.loads((path / "train_state.json").read_text())


def saved_world_size(path: Path) -> int:
    return len(json.loads((path / "train_state.json").read_text())["ranks"])


def ensure_universal(path: Path) -> Path:
    """Convert a checkpoint's sharded engine state to DeepSpeed's universal format (once, atomically),
    so it loads on any number of ranks. Runs on one rank."""
    import subprocess
    import sys

    target = path / UNIVERSAL_TAG
    if target.exists():
        return target
    partial = path / f".{UNIVERSAL_TAG}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(path / ENGINE_TAG), "--output_folder", str(partial), "--num_extract_workers", "1",
                             "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not convert {path / ENGINE_TAG} to DeepSpeed's universal format:\n"
                           f"{result.stderr[-2000:]}")
    os.replace(partial, target)
    return target


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> List[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def save_tensor_file(obj: Any) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


def save_text_file(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)
