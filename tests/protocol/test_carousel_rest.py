"""The carousel rests after a loop every receiver heard whole: repairs only, and a rest frame that tells
receivers to ask now for what they lack (docs/PROTOCOL.md section 7)."""

import json
import os
import random

from vmcast.protocol import (
    Carousel,
    Idle,
    RepairPlanner,
    RepairRequest,
    SendData,
    SendMetadata,
    manifest_of,
    parse_metadata,
)

from .memlink import MemoryReceiver

COOKIE = b"restful!"


def one_loop(carousel: Carousel, now: float) -> list[object]:
    """Every action up to and including the last frame of the loop under way."""
    loops, actions = carousel.loops_completed, []
    while carousel.loops_completed == loops:
        actions.append(carousel.next_send(now))
    return actions


def rest_fields(action: SendMetadata) -> dict:
    (datagram,) = action.datagrams
    return json.loads(datagram[16:])


def test_after_a_loop_that_started_once_everyone_listened_the_carousel_rests_and_says_so():
    manifest = manifest_of(os.urandom(10_000), frame_size=1000, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    carousel.listening_since = 0.0
    one_loop(carousel, 0.0)  # its metadata went out at 0.0: every receiver listened then
    assert (carousel.resting, carousel.rests, carousel.data_frames_sent) == (True, 1, 10)

    signal = carousel.next_send(0.01)
    assert isinstance(signal, SendMetadata) and signal.datagrams == carousel.rest_datagrams
    fields = rest_fields(signal)
    assert fields["rest"] is True and fields["sha1"] == manifest.sha1 and "xxh3" not in fields
    assert parse_metadata(fields).rest
    following = [carousel.next_send(0.02) for _ in range(3)]
    assert isinstance(following[0], SendMetadata) and following[0].datagrams == carousel.metadata_datagrams
    assert all(isinstance(action, Idle) for action in following[1:]), "no carousel frame while resting"
    assert following[-1].until == 0.11, "the next rest frame is due a tenth of a second after the last"
    assert isinstance(carousel.next_send(0.11), SendMetadata)
    assert carousel.data_frames_sent == 10


def test_a_receiver_that_joined_after_the_loop_started_keeps_the_carousel_going():
    manifest = manifest_of(os.urandom(10_000), frame_size=1000, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    carousel.next_send(0.0)  # the loop starts at 0.0
    carousel.listening_since = 0.5  # the last receiver joined later: it missed the loop's first frames
    one_loop(carousel, 1.0)
    assert not carousel.resting
    one_loop(carousel, 2.0)  # this loop started at 1.0, after the join
    assert carousel.resting and carousel.loops_completed == 2


def test_without_knowing_every_receiver_the_carousel_loops_forever():
    manifest = manifest_of(os.urandom(10_000), frame_size=1000, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    for loop in range(3):
        one_loop(carousel, float(loop))
    assert (carousel.resting, carousel.rests, carousel.data_frames_sent) == (False, 0, 30)


def test_a_resting_carousel_sends_the_repairs_asked_for_back_to_back():
    manifest = manifest_of(os.urandom(10_000), frame_size=1000, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    carousel.listening_since = 0.0
    one_loop(carousel, 0.0)
    carousel.request_repair(RepairRequest(ranges=((2, 3), (9, 1))), 0.1)
    sent = [carousel.next_send(0.1) for _ in range(8)]
    repairs = [action.offset // 1000 for action in sent if isinstance(action, SendData)]
    assert repairs == [2, 3, 4, 9], "all four, none of them waiting for a carousel frame between"
    assert all(action.repair for action in sent if isinstance(action, SendData))
    assert isinstance(sent[-1], Idle) and carousel.data_frames_sent == 10


def test_a_new_receiver_ends_the_rest_with_a_new_loop_from_the_first_frame():
    manifest = manifest_of(os.urandom(10_000), frame_size=1000, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    carousel.listening_since = 0.0
    one_loop(carousel, 0.0)
    assert isinstance(carousel.next_send(0.5), SendMetadata)  # the rest frame
    carousel.listening_since = None  # a lease whose holder has not joined yet
    start = carousel.next_send(1.0)
    assert isinstance(start, SendMetadata) and start.datagrams == carousel.metadata_datagrams
    assert carousel.next_send(1.0).offset == 0
    carousel.listening_since = 1.2  # it joined just after the new loop started: it needs the loop after
    one_loop(carousel, 1.5)
    assert not carousel.resting and carousel.rests == 1


def test_rest_must_be_true_or_false():
    manifest = manifest_of(os.urandom(1000), frame_size=100)
    fields = manifest.rest_metadata()
    assert parse_metadata({**fields, "rest": False}).rest is False
    assert not hasattr(parse_metadata({**fields, "rest": 1}), "rest"), "1 is not true: the frame is dropped"
    assert not parse_metadata(manifest.metadata_frames()[0]).rest


def test_a_planner_told_of_a_rest_asks_for_the_frames_just_behind_the_position_too():
    from bitarray import bitarray

    layout = manifest_of(bytes(1_000_000), frame_size=1000).layout
    received = bitarray(layout.frame_count)
    received.setall(1)
    received[995] = received[400] = 0
    planner = RepairPlanner(layout=layout, received=received)
    for frame in range(layout.frame_count):  # joined at the loop's first frame, saw it to the last
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(1.0, jitter=0.0).ranges == ((400, 1),), "995 may still be on its way"
    planner.observe_rest()
    assert planner.passed_everything
    assert planner.poll(1.1, jitter=0.0).ranges == ((995, 1),), "behind a rest frame nothing is on its way"


def test_a_planner_that_heard_no_carousel_frame_before_the_rest_asks_for_everything():
    from bitarray import bitarray

    layout = manifest_of(bytes(20_000), frame_size=1000).layout
    received = bitarray(layout.frame_count)
    received.setall(0)
    planner = RepairPlanner(layout=layout, received=received)
    planner.observe_rest()
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(1.0, jitter=0.0).ranges == ((0, 20),)


def run_resting(image: bytes, *, receivers: int, loss: float, seed: int, fec: bool) -> tuple[float, Carousel, list[MemoryReceiver]]:
    """Receivers all listening from the start, on lossy links, with repairs and the rest frame acted on."""
    rng = random.Random(seed)
    manifest = manifest_of(image, frame_size=1000, block_size=8000, fec=fec)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=0.05)
    carousel.listening_since = 0.0
    nodes = [MemoryReceiver(cookie=COOKIE) for _ in range(receivers)]
    planners: list[RepairPlanner | None] = [None] * receivers
    now = 0.0
    while not all(node.complete for node in nodes):
        assert now < 10, "did not complete"
        action = carousel.next_send(now)
        if isinstance(action, Idle):
            now = min(action.until, now + 1e-3)
        elif isinstance(action, SendMetadata):
            for datagram in action.datagrams:
                for i, node in enumerate(nodes):
                    if node.complete or rng.random() < loss:
                        continue
                    node.feed(datagram)
                    if planners[i] is None and node.assembly.layout is not None:
                        assembly = node.assembly
                        planners[i] = RepairPlanner(layout=assembly.layout, received=assembly.held_frames, interval=0.01, rerequest_after=0.05,
                                                    fec=assembly.fec, parity_held=assembly.parity_held if assembly.fec else None)
                    if planners[i] is not None and parse_metadata(json.loads(datagram[16:])).rest:
                        planners[i].observe_rest()
        else:
            payload = node_payload(action, image, manifest)
            for i, node in enumerate(nodes):
                if node.complete or rng.random() < loss:
                    continue
                node.feed(action.header + payload)
                if planners[i] is not None and not action.repair:
                    planners[i].observe_carousel(action.offset // 1000)
        for planner, node in zip(planners, nodes):
            if planner is not None and not node.complete:
                request = planner.poll(now, jitter=rng.random())
                if request is not None and rng.random() >= loss:
                    carousel.request_repair(request, now)
        now += 1e-5
    return now, carousel, nodes


def node_payload(action: object, image: bytes, manifest: object) -> bytes:
    if isinstance(action, SendData):
        return image[action.offset : action.offset + action.length]
    from vmcast.protocol import ParityEncoder

    first, end = manifest.layout.block_span(action.block)
    return ParityEncoder(image[first:end], frame_size=manifest.layout.frame_size).symbols(action.esi, 1)[0]


def test_lossy_receivers_listening_from_the_start_finish_from_one_loop_and_repairs_only():
    image = random.Random(5).randbytes(2_000_000)
    for fec in (False, True):
        # 2% at each of 4 receivers: what they lack at the loop's end stays under the rest's repair budget.
        _, carousel, nodes = run_resting(image, receivers=4, loss=0.02, seed=2, fec=fec)
        assert all(bytes(node.disk) == image for node in nodes)
        assert carousel.data_frames_sent == 2000, "each frame once: what was lost came as repairs"
        assert carousel.rests == 1 and carousel.loops_completed == 1
        assert carousel.repair_frames_sent + carousel.parity_frames_sent > 0


def test_a_rest_ends_with_a_new_loop_once_its_repairs_reach_an_eighth_of_a_loop():
    # Receivers that lack that much take a loop at no cost to them: repairs alone (parity especially) cost CPU
    # on both sides, and a receiver that could not keep up with the loop would not keep up with them either.
    manifest = manifest_of(os.urandom(1_000_000), frame_size=1000, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    carousel.listening_since = 0.0
    one_loop(carousel, 0.0)
    assert isinstance(carousel.next_send(0.1), SendMetadata)  # the rest frame
    assert isinstance(carousel.next_send(0.1), SendMetadata)  # the metadata, due with every loop's end
    carousel.request_repair(RepairRequest(ranges=((300, 200),)), 0.1)
    repairs = []
    while isinstance(action := carousel.next_send(0.1), SendData):
        repairs.append(action.offset // 1000)
    assert repairs == list(range(300, 425)), "1,000 frames a loop: 125 repairs, then the rest ends"
    assert isinstance(action, SendMetadata) and action.datagrams == carousel.metadata_datagrams, "a new loop"
    following = [carousel.next_send(0.1) for _ in range(4)]
    assert [(a.offset // 1000, a.repair) for a in following] == [(425, True), (0, False), (426, True), (1, False)]
    assert not carousel.resting
