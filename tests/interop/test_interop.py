"""Interoperation both ways with an independent implementation of docs/PROTOCOL.md (tests/interop/minimal_peer.py,
written from the document alone, standard library only, using only `sha1`/`len` metadata)."""

from tests.e2e.processes import sha1_of, write_random_image
from tests.protocol.test_golden import DATA_FRAME, METADATA_FRAME

from .minimal_peer import parse_datagram, parse_metadata
from .peer_processes import (
    minimal_receiver_takes_from_vmcast_serve,
    vmcast_receive_takes_from_the_minimal_sender,
)


def test_the_independent_parser_reads_the_golden_frames():
    cookie, offset, payload = parse_datagram(DATA_FRAME)
    assert (cookie.hex(), offset, payload) == ("766d636173740001", 2800, b"vmcast!")
    _, _, metadata = parse_datagram(METADATA_FRAME)
    assert parse_metadata(metadata)["sha1"] == "15268c1c0acbfae8ecc1c2832b68f2c32e3c48d5"


def test_vmcast_receive_takes_an_image_from_a_minimal_third_party_sender(tmp_path):
    image = tmp_path / "image.raw"
    expected = write_random_image(image, 24)
    code, summary = vmcast_receive_takes_from_the_minimal_sender(
        image, group="239.255.201.7", output=tmp_path / "out.raw", log=tmp_path / "r.log"
    )
    assert code == 0, (tmp_path / "r.log").read_text()[-2000:]
    assert summary["sha1"] == expected == sha1_of(tmp_path / "out.raw")


def test_a_minimal_third_party_receiver_takes_an_image_from_vmcast_serve(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    expected = write_random_image(images / "disk.raw", 24)
    peer = minimal_receiver_takes_from_vmcast_serve(images / "disk.raw", output=tmp_path / "out.raw", tmp=tmp_path)
    assert peer.returncode == 0, peer.stdout + peer.stderr
    assert f"verified sha1={expected}" in peer.stdout
    assert sha1_of(tmp_path / "out.raw") == expected
