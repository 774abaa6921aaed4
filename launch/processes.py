"""Running torchrun as a child of a launcher (`launch local`, the node agent `launch.node`): which signal to pass
on, how long torchrun may wait for its ranks to stop, and the exit status to report."""
from __future__ import annotations

import signal
from typing import List


def as_stop_signal(signum: int) -> int:
    """What a launcher passes on to torchrun: Ctrl-C stays SIGINT (stop at once); anything else becomes
    SIGTERM, which torchrun hands to every rank (they checkpoint and exit). SIGUSR1 would kill torchrun."""
    return signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM


def shutdown_timeout_args(seconds: int) -> List[str]:
    """torchrun kills its ranks 30 s after a SIGTERM unless told otherwise (the option is newer than some torch)."""
    from torch.distributed.run import get_args_parser

    known = {option for action in get_args_parser()._actions for option in action.option_strings}
    return [f"--shutdown-timeout={seconds}"] if "--shutdown-timeout" in known else []


def exit_status(returncode: int) -> int:
    """A child killed by signal n reports -n; a shell would say 128 + n."""
    return 128 - returncode if returncode < 0 else returncode
