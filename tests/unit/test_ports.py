"""data/ray_head.free_local_port: the port a server (a Ray head's GCS, the ranks' rendezvous store, the test S3
server) is started on."""
import socket

from data.ray_head import _ephemeral_range_start, free_local_port


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound():
    """The kernel hands ports of its ephemeral range to every process that binds port 0: one picked there and closed
    again could be taken before the server binds it (EADDRINUSE: a Ray head that failed to start, in a clean-clone
    suite run). Below the range nobody is handed it."""
    low = _ephemeral_range_start()
    assert low > 12000  # Linux's default starts at 32768; with no room below, the kernel's pick is the fallback
    for _ in range(20):
        port = free_local_port()
        assert 10000 <= port < low
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))
