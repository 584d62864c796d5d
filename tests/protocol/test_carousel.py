"""The sender's schedule: loops, metadata at each loop start and at least every interval."""

import os

from vmcast.protocol import Carousel, Idle, SendData, SendMetadata, manifest_of

COOKIE = b"carousel"


def test_every_loop_starts_with_metadata_and_sends_each_frame_once():
    manifest = manifest_of(os.urandom(10_000), frame_size=1000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    actions = [carousel.next_send(0.0) for _ in range(2 * 11)]
    assert isinstance(actions[0], SendMetadata) and isinstance(actions[11], SendMetadata)
    assert [a.offset for a in actions[1:11]] == list(range(0, 10_000, 1000))
    assert carousel.loops_completed == 2


def test_metadata_is_repeated_within_a_loop_once_the_interval_passes():
    manifest = manifest_of(os.urandom(100_000), frame_size=1000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=1.0)
    kinds = [type(carousel.next_send(t * 0.1)).__name__ for t in range(30)]
    assert [i for i, kind in enumerate(kinds) if kind == "SendMetadata"] == [0, 10, 20]
    assert kinds.count("SendMetadata") == 3


def test_an_empty_image_idles_between_metadata_rounds_instead_of_flooding():
    carousel = Carousel(manifest=manifest_of(b""), cookie=COOKIE, metadata_interval=1.0)
    assert isinstance(carousel.next_send(0.0), SendMetadata)
    idle = carousel.next_send(0.5)
    assert isinstance(idle, Idle) and idle.until == 1.0
    assert isinstance(carousel.next_send(1.0), SendMetadata)


def test_the_last_frame_of_an_image_may_be_short():
    manifest = manifest_of(os.urandom(2500), frame_size=1000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE)
    carousel.next_send(0.0)
    lengths = [carousel.next_send(0.0).length for _ in range(3)]
    assert lengths == [1000, 1000, 500]
    assert isinstance(carousel.next_send(0.0), SendMetadata)


def test_parity_goes_out_one_for_one_with_carousel_frames_and_takes_turns_with_frame_repairs():
    from vmcast.protocol import RepairRequest, SendParity, encode_parity_header

    manifest = manifest_of(os.urandom(100_000), frame_size=1000, block_size=10_000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    carousel.next_send(0.0)
    carousel.request_repair(RepairRequest(ranges=((50, 2),), parity=((6, 3),)))
    kinds = []
    for _ in range(10):
        action = carousel.next_send(0.0)
        if isinstance(action, SendParity):
            assert action.repair and action.header == encode_parity_header(COOKIE, block=action.block, esi=action.esi)
            kinds.append(f"P{action.block}:{action.esi}")
        else:
            kinds.append(f"R{action.offset // 1000}" if action.repair else "C")
    assert kinds == ["R50", "C", "P6:10", "C", "R51", "C", "P6:11", "C", "P6:12", "C"]
    assert (carousel.parity_frames_sent, carousel.repair_frames_sent, carousel.data_frames_sent) == (3, 2, 5)


def test_a_carousel_without_fec_never_sends_parity():
    from vmcast.protocol import RepairRequest, SendParity

    manifest = manifest_of(os.urandom(100_000), frame_size=1000, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE)
    carousel.request_repair(RepairRequest(parity=((0, 5),)))
    assert not any(isinstance(carousel.next_send(0.0), SendParity) for _ in range(300))
