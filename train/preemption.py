"""Stop requests from a scheduler: checkpoint after the current step, then exit for a requeue.

Two ways a scheduler asks:
  * a signal to the training processes: SIGTERM (Kubernetes eviction, passed on by the node agent and
    torchrun) or SIGUSR1. (SLURM's `scancel` signals every process of the step, Ray's too, so that
    checkpoint usually cannot reach the data coordinator and the run resumes from the last periodic
    checkpoint; SLURM time limits and preemption go through the stop file below.)
  * a file appearing at the path in KINO_STOP_FILE: the SLURM batch script creates it when SLURM warns of
    the time limit (`--signal=B:USR1@N`), which reaches every rank on every node at once without
    signalling processes the batch shell does not own.
Ranks notice at different moments, so they agree by an all-reduce after every step and all stop after
the same one; a collective left half-entered would hang the checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

from train.collectives import MAX, all_reduce_values

STOP_FILE_ENV = "KINO_STOP_FILE"
# A signal means the process is being taken away: exit 75 (EX_TEMPFAIL), not a success, so Kubernetes
# restarts the pods. The stop file is the batch script's own clean request (it requeues the job itself): exit 0.
EXIT_PREEMPTED = 75


class StopRequest:
    def __init__(self, device: torch.device, stop_file: Optional[str] = None):
        self.device = device
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV) or None
        self.reason: Optional[str] = None
        self.by_signal = False
        self._signalled: Optional[str] = None
        self.install()

    def install(self) -> None:
        """(Re)install the handlers: `ray.init` replaces SIGTERM's with one that exits at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            if signal.getsignal(signum) != self._on_signal:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, and a repeated signal (SLURM and torchrun both pass
        # SIGTERM on) changes nothing. A process that hangs is still killed by the scheduler's SIGKILL.
        self._signalled = signal.Signals(signum).name

    def _stop_file_exists(self) -> bool:
        return bool(self.stop_file) and os.path.exists(self.stop_file)

    def exit_status(self) -> int:
        return EXIT_PREEMPTED if self.by_signal else 0

    def local_reason(self) -> Optional[str]:
        if self._signalled:
            return self._signalled
        if self._stop_file_exists():
            return f"stop file {self.stop_file}"
        return None

    def agreed(self) -> bool:
        """True on every rank once any rank has a request (collective: call it on all ranks each step).
        The kind is agreed too (signal beats file), so every rank exits with the same status even where
        a shared file system shows the stop file late."""
        self.install()  # cheap when nothing changed; Ray may have connected lazily during the step
        local = self.local_reason()
        kind = 2 if self._signalled else (1 if local else 0)
        kind = int(all_reduce_values([kind], self.device, MAX, dtype=torch.int64)[0])
        if kind and self.reason is None:
            self.reason = local or ("another rank was signalled" if kind == 2 else "another rank saw the stop file")
            self.by_signal = kind == 2
        return kind > 0
