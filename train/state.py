"""What a checkpoint holds: every resumable piece of a run is a Stateful (`state_dict` / `load_state_dict`)
named in one dict (Trainer.resumable_state) and saved and restored by train/checkpoint.py's
CheckpointManager, in that dict's order. Where a piece lives in step_N/ is its `Resumable.scope`:

  engine   the DeepSpeed engine (model, optimizer; sharded under ZeRO)  -> step_N/engine/
  shared   one value for the whole run, written by rank 0               -> step_N/train_state.json[name]
  rank     one value per rank                                           -> step_N/train_state.json["ranks"][r][name]
  file     a file of its own, written by rank 0 (.pt, .json or .yaml)   -> step_N/<file>
  sharded  a file per rank, restored on any number of ranks             -> step_N/<file>/rank_RRRRR.pt
           (load_state_dict gets the list of every saved rank's file: the EMA, train/ema.py)

A rank restores only the pieces it passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

SCOPES = ("engine", "shared", "rank", "file", "sharded")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class Resumable:
    state: Stateful
    scope: str
    file: Optional[str] = None  # scope "file" (a file name) and "sharded" (a directory name) only

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r}: one of {SCOPES}")
        if (self.scope in ("file", "sharded")) != (self.file is not None):
            raise ValueError("a file name goes with scopes 'file' and 'sharded', and only with them")


class Value:
    """A Stateful over a getter and a setter: for plain values such as the count of skipped steps."""

    def __init__(self, get: Callable[[], Any], set: Optional[Callable[[Any], None]] = None):
        self._get, self._set = get, set

    def state_dict(self) -> Any:
        return self._get()

    def load_state_dict(self, state: Any) -> None:
        if self._set is not None:
            self._set(state)
