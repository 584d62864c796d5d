"""`zero_frames` metadata (docs/PROTOCOL.md sections 3-5) in the independent peer (tests/interop/minimal_peer.py), and
end to end both ways with an image whose zeros are 1 MiB-aligned chunks that the checksum blocks straddle."""

import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e.processes import sha1_of
from tests.protocol.zero_frames_example import EXAMPLE, EXAMPLE_JSON

from .minimal_peer import (
    MalformedMetadata,
    Receiver,
    encode_frame,
    encode_metadata,
    parse_datagram,
    parse_metadata,
)
from .peer_processes import (
    minimal_receiver_takes_from_vmcast_serve,
    vmcast_receive_takes_from_the_minimal_sender,
    write_image_of_mib_chunks,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# Section 3, "Example with zero frames" (EXAMPLE, EXAMPLE_JSON), as frames of this cookie.
COOKIE = bytes.fromhex("766d636173740001")
METADATA_FRAME = encode_metadata(COOKIE, json.loads(EXAMPLE_JSON))
SENT_FRAMES = [encode_frame(COOKIE, offset, EXAMPLE[offset : offset + 16]) for offset in (0, 48, 144)]


def test_the_documents_example_parses_and_completes_from_frames_0_3_and_9_over_other_bytes(tmp_path):
    doc = PROTOCOL_MD.read_text()
    assert EXAMPLE_JSON in re.findall(r"```json\n(.*?)\n```", doc[doc.index("## 3.") : doc.index("## 4.")], re.DOTALL)
    assert hashlib.sha1(EXAMPLE).hexdigest() == json.loads(EXAMPLE_JSON)["sha1"]
    _, offset, payload = parse_datagram(METADATA_FRAME)
    assert offset == 0xFFFFFFFFFFFFFFFF and parse_metadata(payload)["zero_frames"] == [[1, 2], [8, 1]]

    target = tmp_path / "out.raw"
    target.write_bytes(os.urandom(400))
    with target.open("r+b") as out:
        receiver = Receiver(COOKIE, out)
        assert receiver.feed(METADATA_FRAME) is False
        assert receiver.held_count == 7  # block 1 (4 frames, `zero`) and frames 1, 2 and 8 (`zero_frames`)
        assert [receiver.feed(frame) for frame in SENT_FRAMES] == [False, False, True]
    assert target.read_bytes() == EXAMPLE
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
    assert target.read_bytes() == EXAMPLE


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


def test_the_minimal_receiver_takes_an_image_of_zero_chunks_from_vmcast_serve(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    expected = write_image_of_mib_chunks(images / "chunks.raw", data_mib=NONZERO_MIB)
    output = tmp_path / "out.raw"
    peer = minimal_receiver_takes_from_vmcast_serve(images / "chunks.raw", output=output, tmp=tmp_path)
    assert peer.returncode == 0, peer.stdout + peer.stderr
    assert f"verified sha1={expected}" in peer.stdout
    counters = json.loads(peer.stdout.split("counters ", 1)[1])
    assert counters["zero_frames"] > 1000 and counters["zero_blocks"] > 0
    assert counters["written"] < 5 * (1 << 20) // 1400 + 20, "only the frames that hold data came"
    assert sha1_of(output) == expected


def test_vmcast_receive_takes_an_image_of_zero_chunks_from_the_minimal_sender_that_sends_every_frame(tmp_path):
    image = tmp_path / "chunks.raw"
    expected = write_image_of_mib_chunks(image, data_mib=NONZERO_MIB)
    code, summary = vmcast_receive_takes_from_the_minimal_sender(
        image, group="239.255.201.11", output=tmp_path / "out.raw", log=tmp_path / "r.log"
    )
    assert code == 0, (tmp_path / "r.log").read_text()[-2000:]
    assert summary["sha1"] == expected == sha1_of(tmp_path / "out.raw")
