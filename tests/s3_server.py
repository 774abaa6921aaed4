"""A real S3-compatible server on 127.0.0.1 (moto in server mode), for the tests and `make demo-s3`.

`local_s3(log)` starts `python -m moto.server` on a free port and yields the environment a user would set for a
bucket: the AWS key pair and AWS_ENDPOINT_URL (botocore reads it, so nothing in Kino's config names the server).
The data lives in the server's memory and goes with it."""
from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional


@contextlib.contextmanager
def local_s3(log: Path, secret: Optional[str] = None) -> Iterator[Dict[str, str]]:
    from data.ray_head import free_local_port

    port = free_local_port()
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {Path(log).read_text()[-2000:]}")
                time.sleep(0.2)
        yield {"AWS_ACCESS_KEY_ID": "kino-local-key", "AWS_SECRET_ACCESS_KEY": secret or secrets.token_hex(12),
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def make_bucket(url: str) -> None:
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(url)


def files_under(url: str):
    from upath import UPath

    return [p for p in UPath(url).rglob("*") if p.is_file()]
