"""End to end over real loopback multicast: `vmcast receive IMAGE --format qcow2` of a raw image."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from ..e2e.processes import receiver_result, running_server, sha1_of, start_receiver, write_random_image


def test_a_raw_image_received_as_qcow2_is_verified_and_converts_back_to_the_raw_bytes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    source = images / "vm.raw"
    write_random_image(source, 8)
    with source.open("r+b") as handle:
        handle.truncate(24 << 20)  # 16 MiB of zeros at the end, as VM images have: a qcow2 leaves them out
    original_sha1 = sha1_of(source)
    received = tmp_path / "vm.qcow2"
    with running_server(images, tmp_path, "--rate", "0") as url:
        receiver = start_receiver(
            "vm.raw", "--format", "qcow2", "--server", url, "--output", str(received), log=tmp_path / "r.log"
        )
        code, summary = receiver_result(receiver, timeout=120)
    assert code == 0, (tmp_path / "r.log").read_text()[-2000:]
    assert (summary["format"], summary["sha1"]) == ("qcow2", sha1_of(received))
    # The server's conversion, cached by the raw image's content, is what was received.
    cached = tmp_path / "cache" / "qcow2" / f"{hashlib.sha256(source.read_bytes()).hexdigest()}.qcow2"
    assert sha1_of(cached) == summary["sha1"]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(received)], check=True, capture_output=True, text=True
        ).stdout
    )
    assert (info["format"], info["virtual-size"]) == ("qcow2", 24 << 20)
    assert received.stat().st_size < 12 << 20, "the zeros are not in the qcow2"
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(received), str(back)], check=True)
    assert sha1_of(back) == original_sha1
