"""`python -m launch.torchrun ARGS`: torchrun itself (the same arguments, agent and restarts), with one change for a
rank that fails on its own: torchrun's ChildFailedError traceback and table become one line naming the rank, and
the launcher exits with that rank's status (2 for a user's mistake, 3 for non-finite losses) instead of 1. The rank's
own message is already above it. Stops by signal are torchrun's as before."""
from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode
        print(f"kino launch: rank {rank} exited with status {code} (its message is above); the other ranks "
              f"were stopped", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
