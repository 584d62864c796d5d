"""Interoperation both ways with an independent implementation of docs/PROTOCOL.md (tests/interop/minimal_peer.py,
written from the document alone, standard library only, using only `sha1`/`len` metadata)."""

import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.processes import VMCAST, free_udp_port, receiver_result, running_server, sha1_of, start_receiver, write_random_image
from tests.protocol.test_golden import DATA_FRAME, METADATA_FRAME

from .minimal_peer import parse_datagram, parse_metadata

PEER = [sys.executable, str(Path(__file__).with_name("minimal_peer.py"))]
COOKIE = "0123456789abcdef"


def test_the_independent_parser_reads_the_golden_frames():
    cookie, offset, payload = parse_datagram(DATA_FRAME)
    assert (cookie.hex(), offset, payload) == ("766d636173740001", 2800, b"vmcast!")
    _, _, metadata = parse_datagram(METADATA_FRAME)
    assert parse_metadata(metadata)["sha1"] == "15268c1c0acbfae8ecc1c2832b68f2c32e3c48d5"


def test_vmcast_receive_takes_an_image_from_a_minimal_third_party_sender(tmp_path):
    image = tmp_path / "image.raw"
    expected = write_random_image(image, 24)
    port = free_udp_port()
    group = "239.255.201.7"
    sender = subprocess.Popen(
        [*PEER, "send", "--group", group, "--port", str(port), "--cookie", COOKIE, "--file", str(image),
         "--seconds", "60", "--rate-mbit", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        receiver = start_receiver("--group", group, "--port", str(port), "--cookie", COOKIE, "--output",
                                  str(tmp_path / "out.raw"), "--interface", "127.0.0.1", log=tmp_path / "r.log")
        code, summary = receiver_result(receiver, timeout=60)
    finally:
        sender.terminate()
        sender.wait(timeout=10)
    assert code == 0, (tmp_path / "r.log").read_text()[-2000:]
    assert summary["sha1"] == expected == sha1_of(tmp_path / "out.raw")


def test_a_minimal_third_party_receiver_takes_an_image_from_vmcast_serve(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    expected = write_random_image(images / "disk.raw", 24)
    with running_server(images, tmp_path, "--rate", "400mbit") as url:
        lease = httpx.post(f"{url}/v1/streams", json={"image": "disk.raw", "format": "raw"}, timeout=120).json()
        try:
            peer = subprocess.run(
                [*PEER, "receive", "--group", lease["group"], "--port", str(lease["port"]), "--cookie", lease["cookie"],
                 "--output", str(tmp_path / "out.raw"), "--timeout", "60"],
                capture_output=True, text=True, timeout=90,
            )
        finally:
            httpx.delete(f"{url}/v1/leases/{lease['lease_id']}")
    assert peer.returncode == 0, peer.stdout + peer.stderr
    assert f"verified sha1={expected}" in peer.stdout
    assert sha1_of(tmp_path / "out.raw") == expected
