"""Test-only entry (under torchrun): `python -m train`, except that from step AFTER_STEP on, every checkpoint
waits DELAY_S seconds with everything written but its COMPLETE marker, so a test can kill the run mid-save.
The fault is injected here, not by a switch in Kino's code.

    python -m torch.distributed.run ... -m tests.integration.slow_checkpoint_run AFTER_STEP DELAY_S key=value ...
"""
import sys
import time
from pathlib import Path


def main() -> int:
    after, delay, overrides = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    from train import checkpoint
    from train.main import main as train_main

    write = checkpoint._atomic_write

    def held_before_complete(path, text):
        if Path(path).name == checkpoint.COMPLETE and int(text) >= after:
            time.sleep(delay)
        return write(path, text)

    checkpoint._atomic_write = held_before_complete
    return train_main(overrides)


if __name__ == "__main__":
    sys.exit(main())
