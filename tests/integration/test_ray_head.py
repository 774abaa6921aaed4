"""The Ray head a run starts for itself (data/ray_head.py), stopped after its processes were signalled from outside."""
import os
import signal
import time

from data.ray_head import _raylet_alive, group_processes, start_private_head, stop_process_group


def living(group: int):
    """The processes of `group` that are neither gone nor zombies."""
    return [pid for pid, _, state in group_processes(group) if state != "Z"]


def test_a_head_whose_raylet_was_signalled_is_seen_as_down_and_stopped_with_nothing_left():
    """A scancel signals every process of the job, Ray's too: `ray start --block` then outlives its raylet and
    ignores the stop's SIGTERM. The stop must see that the raylet is gone and kill the group, leaving nothing."""
    process, _ = start_private_head(80 * 2 ** 20)
    try:
        assert _raylet_alive(process.pid)
        for pid, _, _ in group_processes(process.pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _raylet_alive(process.pid):
            assert time.monotonic() < deadline, "the raylet outlived SIGTERM for 30 s"
            time.sleep(0.2)
        assert process.poll() is None  # `ray start` itself is still there, waiting: what the stop must not wait on
        started = time.monotonic()
        stop_process_group(process, grace=120)
        # Left to itself `ray start` lingers 10-30 s here; killed it takes milliseconds.
        assert time.monotonic() - started < 8, "the stop waited on a head that was already down"
    finally:
        if process.poll() is None:
            stop_process_group(process, grace=0)
    deadline = time.monotonic() + 10
    while living(process.pid):
        assert time.monotonic() < deadline, f"left running: {living(process.pid)}"
        time.sleep(0.2)
