"""`zero_frames` metadata (docs/PROTOCOL.md sections 3-5) in the independent peer (tests/interop/minimal_peer.py), and
end to end both ways with an image whose zeros are 1 MiB-aligned chunks that the checksum blocks straddle."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import (
    free_udp_port,
    receiver_result,
    running_server,
    sha1_of,
    start_receiver,
)

from .minimal_peer import (
    MalformedMetadata,
    Receiver,
    encode_frame,
    encode_metadata,
    parse_datagram,
    parse_metadata,
)

PEER = [sys.executable, str(Path(__file__).with_name("minimal_peer.py"))]
PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# Section 3, "Example with zero frames", copied from the document.
COOKIE = bytes.fromhex("766d636173740001")
IMAGE = b"vmcast zero fram" + bytes(32) + b"es, not blocks!\n" + bytes(80) + b"end"
EXAMPLE_JSON = (
    '{"block":64,"format":"raw","frame":16,"len":147,"name":"frames.raw",'
    '"sha1":"be0f317642f41e6ee1ff742ee4b335cd8392276d","v":1,'
    '"xxh3":{"first":0,"sums":["4e5a5702697cf3e0","2ffb6918c12c256e","c851794bc503c3bb"]},'
    '"zero":[[1,1]],"zero_frames":[[1,2],[8,1]]}'
)
METADATA_FRAME = encode_metadata(COOKIE, json.loads(EXAMPLE_JSON))
SENT_FRAMES = [encode_frame(COOKIE, offset, IMAGE[offset : offset + 16]) for offset in (0, 48, 144)]


def test_the_documents_example_parses_and_completes_from_frames_0_3_and_9_over_other_bytes(tmp_path):
    doc = PROTOCOL_MD.read_text()
    assert EXAMPLE_JSON in re.findall(r"```json\n(.*?)\n```", doc[doc.index("## 3.") : doc.index("## 4.")], re.DOTALL)
    assert hashlib.sha1(IMAGE).hexdigest() == json.loads(EXAMPLE_JSON)["sha1"]
    _, offset, payload = parse_datagram(METADATA_FRAME)
    assert offset == 0xFFFFFFFFFFFFFFFF and parse_metadata(payload)["zero_frames"] == [[1, 2], [8, 1]]

    target = tmp_path / "out.raw"
    target.write_bytes(os.urandom(400))
    with target.open("r+b") as out:
        receiver = Receiver(COOKIE, out)
        assert receiver.feed(METADATA_FRAME) is False
        assert receiver.held_count == 7  # block 1 (4 frames, `zero`) and frames 1, 2 and 8 (`zero_frames`)
        assert [receiver.feed(frame) for frame in SENT_FRAMES] == [False, False, True]
    assert target.read_bytes() == IMAGE
    assert receiver.counters()["zero_frames"] == 3 and receiver.written == 3


def test_a_zero_frame_held_already_is_not_zeroed_and_the_sha1_judges_it(tmp_path):
    target = tmp_path / "out.raw"
    with target.open("w+b") as out:
        receiver = Receiver(COOKIE, out)
        receiver.feed(encode_metadata(COOKIE, {k: v for k, v in json.loads(EXAMPLE_JSON).items() if k != "zero_frames"}))
        receiver.feed(encode_frame(COOKIE, 16, b"\x01" * 16))  # frame 1, wrong bytes
        receiver.feed(METADATA_FRAME)
        assert receiver.counters()["zero_frames"] == 2  # frames 2 and 8; frame 1 is held
        assert [receiver.feed(frame) for frame in SENT_FRAMES] == [False, False, False]
        assert receiver.sha1_mismatches == 1  # everything forgotten; zero frames are zeros again and held
        assert [receiver.feed(frame) for frame in SENT_FRAMES] == [False, False, True]
    assert target.read_bytes() == IMAGE


@pytest.mark.parametrize(
    "zero_frames",
    ["all", [[1]], [[1, 0]], [[1, True]], [[8, 1], [1, 2]], [[1, 2], [2, 1]], [[4, 1]], [[9, 2]]],
    ids=["not-a-list", "single", "empty-run", "bool", "descending", "overlapping", "in-a-zero-block", "past-the-end"],
)
def test_malformed_zero_frames_make_the_frame_malformed(zero_frames):
    fields = dict(json.loads(EXAMPLE_JSON), zero_frames=zero_frames)
    with pytest.raises(MalformedMetadata):
        parse_metadata(json.dumps(fields).encode())
    receiver = Receiver(COOKIE, io.BytesIO())
    receiver.feed(encode_metadata(COOKIE, fields))
    assert receiver.drops["malformed_metadata"] == 1


def test_zero_frames_need_xxh3():
    fields = {k: v for k, v in json.loads(EXAMPLE_JSON).items() if k not in ("xxh3", "zero")}
    with pytest.raises(MalformedMetadata):
        parse_metadata(json.dumps(fields).encode())


# --------------------------------------------------------------------------------------------- end to end


NONZERO_MIB = {1, 4, 5, 9, 14}  # 5 of 16 MiB hold data; every block but a few straddles a chunk boundary


def write_zero_chunk_image(path: Path, mib: int = 16) -> str:
    digest = hashlib.sha1()
    with path.open("wb") as handle:
        for i in range(mib):
            chunk = os.urandom(1 << 20) if i in NONZERO_MIB else bytes(1 << 20)
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def test_the_minimal_receiver_takes_an_image_of_zero_chunks_from_vmcast_serve(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    expected = write_zero_chunk_image(images / "chunks.raw")
    output = tmp_path / "out.raw"
    with running_server(images, tmp_path, "--rate", "400mbit") as url:
        lease = httpx.post(f"{url}/v1/streams", json={"image": "chunks.raw", "format": "raw"}, timeout=120).json()
        try:
            peer = subprocess.run(
                [*PEER, "receive", "--group", lease["group"], "--port", str(lease["port"]), "--cookie", lease["cookie"],
                 "--output", str(output), "--timeout", "60"],
                capture_output=True, text=True, timeout=90, check=False,
            )
        finally:
            httpx.delete(f"{url}/v1/leases/{lease['lease_id']}")
    assert peer.returncode == 0, peer.stdout + peer.stderr
    assert f"verified sha1={expected}" in peer.stdout
    counters = json.loads(peer.stdout.split("counters ", 1)[1])
    assert counters["zero_frames"] > 1000 and counters["zero_blocks"] > 0
    assert counters["written"] < 5 * (1 << 20) // 1400 + 20, "only the frames that hold data came"
    assert sha1_of(output) == expected


def test_vmcast_receive_takes_an_image_of_zero_chunks_from_the_minimal_sender_that_sends_every_frame(tmp_path):
    image = tmp_path / "chunks.raw"
    expected = write_zero_chunk_image(image)
    port, group, cookie = free_udp_port(), "239.255.201.11", "0123456789abcdef"
    sender = subprocess.Popen(
        [*PEER, "send", "--group", group, "--port", str(port), "--cookie", cookie, "--file", str(image),
         "--seconds", "60", "--rate-mbit", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        receiver = start_receiver("--group", group, "--port", str(port), "--cookie", cookie, "--output",
                                  str(tmp_path / "out.raw"), "--interface", "127.0.0.1", log=tmp_path / "r.log")
        code, summary = receiver_result(receiver, timeout=60)
    finally:
        sender.terminate()
        sender.wait(timeout=10)
    assert code == 0, (tmp_path / "r.log").read_text()[-2000:]
    assert summary["sha1"] == expected == sha1_of(tmp_path / "out.raw")
