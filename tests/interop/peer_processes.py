"""The independent peer (minimal_peer.py) and vmcast as real processes on loopback, one direction each: what the
end-to-end interop tests share, so that each test holds only its image and what it asserts."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.processes import (
    free_udp_port,
    receiver_result,
    running_server,
    start_receiver,
)

PEER = [sys.executable, str(Path(__file__).with_name("minimal_peer.py"))]
SENDER_COOKIE = "0123456789abcdef"
MiB = 1 << 20


def write_image_of_mib_chunks(path: Path, *, data_mib: set[int], mib: int = 16) -> str:
    """An image of `mib` chunks of 1 MiB: random where the chunk's number is in `data_mib`, all zeros elsewhere;
    returns its SHA-1. Written chunk by chunk so no test holds the whole image in memory."""
    digest = hashlib.sha1()
    with path.open("wb") as handle:
        for i in range(mib):
            chunk = os.urandom(MiB) if i in data_mib else bytes(MiB)
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def minimal_receiver_takes_from_vmcast_serve(image: Path, *, output: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Serve `image`'s folder with `vmcast serve`, lease a stream of `image`, and run the minimal peer's receiver
    on that lease into `output`; returns the finished peer (its exit code and what it printed). The lease is
    released whatever the peer did, so the server stops promptly."""
    with running_server(image.parent, tmp, "--rate", "400mbit") as url:
        lease = httpx.post(f"{url}/v1/streams", json={"image": image.name, "format": "raw"}, timeout=120).json()
        try:
            return subprocess.run(
                [*PEER, "receive", "--group", lease["group"], "--port", str(lease["port"]), "--cookie", lease["cookie"],
                 "--output", str(output), "--timeout", "60"],
                capture_output=True, text=True, timeout=90, check=False,
            )
        finally:
            httpx.delete(f"{url}/v1/leases/{lease['lease_id']}")


def vmcast_receive_takes_from_the_minimal_sender(image: Path, *, group: str, output: Path, log: Path) -> tuple[int, dict]:
    """Run the minimal peer's sender of `image` on `group` (each test its own, so tests run side by side never
    mix) and `vmcast receive` into `output`, its stderr in `log`; returns the receiver's exit code and JSON
    summary. The sender is stopped whatever the receiver did."""
    port = free_udp_port()
    sender = subprocess.Popen(
        [*PEER, "send", "--group", group, "--port", str(port), "--cookie", SENDER_COOKIE, "--file", str(image),
         "--seconds", "60", "--rate-mbit", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        receiver = start_receiver("--group", group, "--port", str(port), "--cookie", SENDER_COOKIE, "--output",
                                  str(output), "--interface", "127.0.0.1", log=log)
        return receiver_result(receiver, timeout=60)
    finally:
        sender.terminate()
        sender.wait(timeout=10)
