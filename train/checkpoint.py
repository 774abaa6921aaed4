"""Atomic, resumable checkpoints: RUN/checkpoints/step_N/ (docs/architecture.md, "Contracts").

A checkpoint is written under a temporary name, completed with a COMPLETE marker,
renamed into place, and only then named by `latest`; a crash at any point leaves
`latest` on the previous complete checkpoint.
  step_N/engine/          DeepSpeed engine (sharded under ZeRO)
  step_N/train_state.json step, stage, layout (workers, parallel.sequence), data positions, RNG of every rank,
                          tracker id, config hash
  step_N/data_plan.json   the data coordinator's state: per open epoch, finished chunks (a compressed bitmap),
                          begun chunks' acknowledged offsets, the deal (data/coordinator.py)
  step_N/audit.json       what was trained on, per shard and license; what was dropped and why
  step_N/ema/rank_R.pt    the EMA (fp32), each rank's pieces of the trained parameters (train/ema.py)
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
from typing import Any, Dict, List, Optional

from train.collectives import gather_objects
from train.state import Resumable

import torch
import torch.distributed as dist

ENGINE_TAG = "engine"
UNIVERSAL_TAG = "engine_universal"
COMPLETE = "COMPLETE"
LATEST = "latest"
TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class ResumeRefused(RuntimeError):
    """A resume the checkpoint does not allow: the config changed keys that shape training, the curriculum no
    longer puts the checkpoint's step in its stage, or the data changed. A user's mistake: one line and exit 2
    (train/main.py)."""


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


def changed_config_refusal(checkpoint: Path, saved_yaml: str, cfg) -> Optional[str]:
    """Why `checkpoint` (its config.yaml: `saved_yaml`) cannot be resumed with `cfg`: the keys that shape training
    and changed (None: none did)."""
    from conf.schema import changed_trajectory_keys, from_yaml

    changed = changed_trajectory_keys(from_yaml(saved_yaml), cfg)
    if not changed:
        return None
    return (f"cannot resume {checkpoint}: the config changed keys that shape training: {', '.join(changed)} "
            f"(start fresh with train.resume=false or a new train.run_dir)")


def resume_refusal(cfg) -> Optional[str]:
    """The same check before any process starts (`python -m train`, `launch local`), from the run directory's
    latest checkpoint; the trainer checks again when it loads it."""
    if not cfg.train.resume:
        return None
    latest = latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    if latest is None or not (latest / "config.yaml").is_file():
        return None
    return changed_config_refusal(latest, (latest / "config.yaml").read_text(), cfg)


class CheckpointManager:
    """Saves and restores a run's resumable pieces (train/state.py) and owns the cadence: every
    `every` steps, at the last step, and once more when a run stops between them; keep-last-N."""

    def __init__(self, root, rank: int, keep_last: int, every: int = 0):
        self.root = Path(root)
        self.rank = rank
        self.keep_last = keep_last
        self.every = every
        self.last_saved: Optional[int] = None
        self.universal = False  # set by resume_point: the checkpoint was written by another world size

    # -- where to resume -------------------------------------------------------------------------
    def resume_point(self, world_size: int) -> Optional[Path]:
        """The last complete checkpoint, converted (once) to DeepSpeed's universal format when another
        number of ranks wrote it. Collective: every rank calls it; rank 0 converts."""
        path = latest_checkpoint(self.root)
        if path is None:
            return None
        saved_world = saved_world_size(path)
        self.universal = saved_world != world_size
        if self.universal:
            if self.rank == 0:
                import logging

                logging.getLogger("kino").info("%s was written by %d rank(s); converting it to DeepSpeed's universal "
                                               "format to load on %d", path, saved_world, world_size)
                ensure_universal(path)
            _barrier()
        return path

    # -- saving -------------------------------------------------------------------------------------
    def due(self, step: int, last_step: bool) -> bool:
        return last_step or bool(self.every) and step % self.every == 0

    def save_if_due(self, step: int, pieces: Dict[str, Resumable], last_step: bool = False) -> Optional[Path]:
        return self.save(step, pieces) if self.due(step, last_step) else None

    def save_unless_saved(self, step: int, pieces: Dict[str, Resumable]) -> Optional[Path]:
        """When a run stops: a checkpoint of this step, unless the cadence already wrote it."""
        return self.save(step, pieces) if step > 0 and self.last_saved != step else None

    def save(self, step: int, pieces: Dict[str, Resumable]) -> Path:
        """Collective: every rank calls it with its pieces; rank 0 writes the shared ones and the files."""
        final = self.root / f"step_{step}"
        partial = self.root / f".partial_step_{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        shared, own, files = {}, {}, {}
        for name, piece in pieces.items():  # every rank, in order: a state_dict may be a collective
            if piece.scope == "engine":
                # save_latest writes step_N/latest naming the engine tag: the zero_to_fp32.py DeepSpeed copies
                # into step_N/ then works as DeepSpeed users run it (`python zero_to_fp32.py . out`), without --tag.
                piece.state.save_checkpoint(str(partial), tag=ENGINE_TAG, save_latest=True)
            elif piece.scope == "shared":
                shared[name] = piece.state.state_dict()
            elif piece.scope == "rank":
                own[name] = piece.state.state_dict()
            elif piece.scope == "sharded":
                (partial / piece.file).mkdir(exist_ok=True)
                torch.save(piece.state.state_dict(), partial / piece.file / shard_file_name(self.rank))
            else:
                files[piece.file] = piece.state.state_dict()
        ranks = gather_objects(own)
        if self.rank == 0:
            state = dict(shared, step=step, ranks=ranks, saved_at=time.time())
            _atomic_write(partial / TRAIN_STATE, json.dumps(state, indent=1, sort_keys=True))
            for name, value in files.items():
                _write_file(partial / name, value)
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
        self.last_saved = step
        return final

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".partial_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- restoring ----------------------------------------------------------------------------------
    @staticmethod
    def saved_step(path: Path) -> int:
        return int(json.loads((Path(path) / TRAIN_STATE).read_text())["step"])

    def load(self, path: Path, pieces: Dict[str, Resumable]) -> int:
        """Restore each piece this rank passes, in order; returns the checkpoint's step."""
        state = json.loads((path / TRAIN_STATE).read_text())
        ranks = state["ranks"]
        for name, piece in pieces.items():
            if piece.scope == "engine":
                tag = UNIVERSAL_TAG if self.universal else ENGINE_TAG
                load_path, _ = piece.state.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=False)
                if load_path is None:
                    raise RuntimeError(f"DeepSpeed could not load the engine state from {path / tag}")
            elif piece.scope == "shared":
                piece.state.load_state_dict(state.get(name))
            elif piece.scope == "rank":
                # a rank new to this world size has no saved state of its own: it keeps what it has
                if self.rank < len(ranks) and name in ranks[self.rank]:
                    piece.state.load_state_dict(ranks[self.rank][name])
            elif piece.scope == "sharded":
                piece.state.load_state_dict(shard_files(path, piece.file))
            elif (path / piece.file).exists():
                piece.state.load_state_dict(_read_file(path / piece.file))
            else:  # a checkpoint from before the piece had a file of its own kept it in train_state.json
                piece.state.load_state_dict(state.get(name))
        self.last_saved = int(state["step"])
        return int(state["step"])


def _write_file(path: Path, value: Any) -> None:
    if path.suffix == ".pt":
        torch.save(value, path)
    elif path.suffix == ".json":
        _atomic_write(path, json.dumps(value, indent=1, sort_keys=True))
    else:
        _atomic_write(path, value)  # text: the piece's state_dict is the file's text


def _read_file(path: Path) -> Any:
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return path.read_text()


def shard_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def shard_files(path: Path, directory: str) -> List[Path]:
    """Every rank's file of a sharded piece; a checkpoint from before the piece was sharded kept it whole in
    step_N/<directory>.pt, read as one shard."""
    files = sorted((path / directory).glob("rank_*.pt"))
    if not files and (path / f"{directory}.pt").exists():
        files = [path / f"{directory}.pt"]
    if not files:
        raise FileNotFoundError(f"{path}: no {directory}/rank_*.pt")
    return files


def saved_world_size(path: Path) -> int:
    return len(json.loads((path / TRAIN_STATE).read_text())["ranks"])


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


def archive_previous_run(run_dir: Path) -> Optional[Path]:
    """Move an earlier run's outputs aside so a fresh start can neither mix with nor lose them."""
    outputs = [run_dir / name for name in ("checkpoints", "metrics.jsonl", "provenance", "videos")]
    present = [p for p in outputs if p.exists()]
    if not present:
        return None
    target = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in present:
        path.rename(target / path.name)
    return target

