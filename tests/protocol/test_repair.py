"""Repair requests: receivers ask for what the carousel passed and they lost; the sender merges requests."""

import random
from array import array

import pytest
from bitarray import bitarray

from vmcast.protocol import (
    Carousel,
    DataReceived,
    Dropped,
    DropReason,
    RepairPlanner,
    RepairQueue,
    RepairRequest,
    SendData,
    SendMetadata,
    decode_repair_request,
    encode_repair_request,
    encode_repair_requests,
    manifest_of,
)
from vmcast.protocol.repair import MAX_RANGES_PER_REQUEST, PARITY_MARGIN, REREQUEST_AFTER, REREQUEST_AFTER_LIMIT, request_fits

from .memlink import MemoryReceiver

COOKIE = b"repair!!"


def test_a_large_request_is_split_into_datagrams_that_each_fit():
    request = RepairRequest(ranges=tuple((i * 10, 3) for i in range(300)))
    datagrams = encode_repair_requests(COOKIE, request)
    assert len(datagrams) == 7
    decoded = [decode_repair_request(d, cookie=COOKIE, frame_count=10**6) for d in datagrams]
    assert sum((d.ranges for d in decoded), ()) == request.ranges
    assert all(len(d) - 16 <= 1200 for d in datagrams)


def test_a_burst_lost_across_the_end_of_a_loop_is_still_a_wrap_not_a_restart():
    layout = manifest_of(bytes(1_000_000), frame_size=1000).layout  # 1000 frames
    received = _bits(layout.frame_count)
    planner = RepairPlanner(layout=layout, received=received)
    for frame in range(100, 995):  # joined at 100; the loop's last frames 995-999 and 0-4 are lost
        received[frame] = 1
        planner.observe_carousel(frame)
    for frame in range(5, 120):
        received[frame] = 1
        planner.observe_carousel(frame)
    assert planner.passed_everything  # wrapped and came round past the join point: everything was passed


def test_requests_round_trip_and_fit_a_datagram():
    request = RepairRequest(ranges=tuple((i * 1000, 7) for i in range(MAX_RANGES_PER_REQUEST)))
    assert request_fits(request, COOKIE)
    decoded = decode_repair_request(encode_repair_request(COOKIE, request), cookie=COOKIE, frame_count=10**6)
    assert decoded == request


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'{"frames": 3}', b'{"frames": [[1]]}', b'{"frames": [[-1, 2]]}', b'{"frames": [[0, 0]]}',
     b'{"frames": [[99, 5]]}', b'{"frames": [[1, true]]}'],
)
def test_malformed_requests_are_dropped_not_raised(body):
    datagram = encode_repair_request(COOKIE, RepairRequest(ranges=()))[:16] + body
    result = decode_repair_request(datagram, cookie=COOKIE, frame_count=100)
    assert isinstance(result, Dropped)


def test_a_request_of_another_stream_is_foreign():
    datagram = encode_repair_request(b"someone!", RepairRequest(ranges=((0, 1),)))
    assert decode_repair_request(datagram, cookie=COOKIE, frame_count=100).reason is DropReason.FOREIGN_COOKIE


def test_the_queue_sends_a_frame_once_however_many_receivers_ask():
    layout = manifest_of(bytes(100_000), frame_size=1000).layout
    queue = RepairQueue(layout=layout)
    for _ in range(1000):
        queue.add(RepairRequest(ranges=((10, 3), (50, 1))))
    assert queue.pending == 4
    assert [queue.pop() for _ in range(5)] == [10, 11, 12, 50, None]


def test_a_frame_the_carousel_sends_anyway_leaves_the_queue():
    layout = manifest_of(bytes(100_000), frame_size=1000).layout
    queue = RepairQueue(layout=layout)
    queue.add(RepairRequest(ranges=((10, 2),)))
    queue.sent_by_carousel(10)
    assert queue.pending == 1 and queue.pop() == 11


def test_a_planner_asks_only_for_frames_the_carousel_has_passed():
    layout = manifest_of(bytes(1_000_000), frame_size=1000).layout
    received = _bits(layout.frame_count)
    planner = RepairPlanner(layout=layout, received=received)
    for frame in range(300, 700):  # joined at 300; lost 400-409
        if not 400 <= frame < 410:
            received[frame] = 1
        planner.observe_carousel(frame)
    assert planner.poll(0.0, jitter=0.0) is None  # the first poll only sets the timer
    request = planner.poll(10.0, jitter=0.0)
    assert request.ranges == ((400, 10),)  # not 0-299 (not passed yet), not 630-699 (within the reorder margin)
    assert planner.poll(10.15, jitter=0.0) is None  # asked already; not again before it could be served


def test_after_a_whole_loop_a_planner_asks_for_everything_it_lacks():
    layout = manifest_of(bytes(100_000), frame_size=1000).layout
    received = _bits(layout.frame_count)
    planner = RepairPlanner(layout=layout, received=received)
    for frame in [*range(50, 100), *range(0, 60)]:
        if frame not in (5, 70):
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(1.0, jitter=0.0).ranges == ((70, 1),)  # frame 5 is within the margin of position 59
    for frame in range(60, 100):
        planner.observe_carousel(frame)
    planner.poll(5.0, jitter=0.0)
    assert (5, 1) in planner.poll(10.0, jitter=0.0).ranges


def _bits(n):
    from bitarray import bitarray

    bits = bitarray(n)
    bits.setall(0)
    return bits


def run_with_repair(image, *, receivers, loss, seed, use_repair):
    rng = random.Random(seed)
    manifest = manifest_of(image, frame_size=1000, block_size=8000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=0.05)
    nodes = [MemoryReceiver(cookie=COOKIE) for _ in range(receivers)]
    planners: list[RepairPlanner | None] = [None] * receivers
    now = 0.0
    while not all(n.complete for n in nodes):
        assert now < 10, "did not complete"
        action = carousel.next_send(now)
        if isinstance(action, SendMetadata):
            batch = [(d, False, None) for d in action.datagrams]
        else:
            frame = action.offset // 1000
            batch = [(action.header + image[action.offset : action.offset + action.length], action.repair, frame)]
        for datagram, is_repair, frame in batch:
            for i, node in enumerate(nodes):
                if node.complete or rng.random() < loss:
                    continue
                node.feed(datagram)
                if planners[i] is None and node.assembly.layout is not None:
                    planners[i] = RepairPlanner(layout=node.assembly.layout, received=node.assembly.held_frames, interval=0.01, rerequest_after=0.05)
                if planners[i] is not None and frame is not None and not is_repair:
                    planners[i].observe_carousel(frame)
        if use_repair:
            for planner, node in zip(planners, nodes):
                if planner is not None and not node.complete:
                    request = planner.poll(now, jitter=rng.random())
                    if request is not None and rng.random() >= loss:
                        carousel.request_repair(request)
        now += 1e-4
    return now, carousel


def test_with_repair_lossy_receivers_finish_sooner_with_identical_images():
    image = random.Random(3).randbytes(4_000_000)  # 4000 frames: a loop lasts 0.4 simulated seconds
    plain_time, _ = run_with_repair(image, receivers=4, loss=0.05, seed=1, use_repair=False)
    repaired_time, carousel = run_with_repair(image, receivers=4, loss=0.05, seed=1, use_repair=True)
    assert repaired_time < plain_time
    assert carousel.repair_frames_sent > 0
    assert carousel.repairs.frames_requested >= carousel.repair_frames_sent


def test_a_sender_restarting_its_loop_mid_image_is_not_taken_for_a_wrap():
    layout = manifest_of(bytes(1_000_000), frame_size=1000).layout
    received = _bits(layout.frame_count)
    planner = RepairPlanner(layout=layout, received=received)
    for frame in range(300, 600):  # joined at 300, nothing lost
        received[frame] = 1
        planner.observe_carousel(frame)
    for frame in range(0, 200):  # the server restarted: its carousel begins again at frame 0
        received[frame] = 1
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(10.0, jitter=0.0) is None  # 600-999 were never sent: nothing to ask for
    assert planner.steps_back == 1 and planner.last_step_back == (599, 0)
    assert not planner.passed_everything


def test_a_few_frames_seen_out_of_order_are_reordering_not_a_sender_restart():
    # On the test bed a late GRO batch made the carousel's position seem to step back 39 frames; taken for a
    # restart, it made that receiver wait most of a loop for frames it had already seen pass.
    layout = manifest_of(bytes(2_000_000), frame_size=1000).layout
    received = _bits(layout.frame_count)
    planner = RepairPlanner(layout=layout, received=received)
    for frame in [*range(0, 1500), *range(1461, 1500), *range(1500, 1700)]:
        if frame != 100:
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(1.0, jitter=0.0).ranges == ((100, 1),)
    assert planner.steps_back == 0


def test_a_step_back_from_mid_image_keeps_what_was_passed():
    # Whether datagrams reordered by many batches or a sender that restarted its loop at 900: frame 100 was
    # sent and lost, so it is asked for now. Taking the step for a new join point made it wait a whole loop.
    layout = manifest_of(bytes(2_000_000), frame_size=1000).layout
    received = _bits(layout.frame_count)
    planner = RepairPlanner(layout=layout, received=received)
    for frame in [*range(0, 1500), *range(900, 1000)]:
        if frame != 100:
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(1.0, jitter=0.0).ranges == ((100, 1),)
    assert planner.steps_back == 1 and planner.last_step_back == (1499, 900)


def test_after_a_step_back_a_whole_loop_still_counts_as_everything_passed():
    layout = manifest_of(bytes(1_000_000), frame_size=1000).layout
    received = _bits(layout.frame_count)
    planner = RepairPlanner(layout=layout, received=received)
    # Joined at 300; the sender restarted at 500 (back from 700), then its carousel went on, wrapped and came
    # round to the join point: every frame has been sent since.
    for frame in [*range(300, 700), *range(500, 1000), *range(0, 300)]:
        planner.observe_carousel(frame)
    assert not planner.passed_everything
    planner.observe_carousel(300)
    assert planner.passed_everything


# -- parity requests (docs/PROTOCOL.md section 8) ---------------------------------------------------------------


def test_a_request_with_parity_round_trips_and_keeps_the_frames_key_for_senders_without_parity():
    request = RepairRequest(ranges=((5, 2),), parity=((0, 3), (7, 1)))
    datagram = encode_repair_request(COOKIE, request)
    assert datagram[16:] == b'{"v":1,"frames":[[5,2]],"parity":[[0,3],[7,1]]}'
    assert decode_repair_request(datagram, cookie=COOKIE, frame_count=100, block_count=8) == request
    # A sender without parity (no block_count) serves the frames and ignores the rest.
    assert decode_repair_request(datagram, cookie=COOKIE, frame_count=100) == RepairRequest(ranges=((5, 2),))


def test_parity_entries_and_ranges_share_the_per_datagram_limit():
    from vmcast.protocol import encode_repair_requests

    request = RepairRequest(ranges=tuple((i * 10, 3) for i in range(30)), parity=tuple((b, 700) for b in range(100)))
    datagrams = encode_repair_requests(COOKIE, request)
    assert len(datagrams) == 3 and all(len(d) - 16 <= 1200 for d in datagrams)
    decoded = [decode_repair_request(d, cookie=COOKIE, frame_count=10**6, block_count=100) for d in datagrams]
    assert sum((d.ranges for d in decoded), ()) == request.ranges
    assert sum((d.parity for d in decoded), ()) == request.parity


@pytest.mark.parametrize(
    "parity",
    [b'3', b'[[1]]', b'[[-1, 2]]', b'[[8, 1]]', b'[[0, 0]]', b'[[0, 8193]]', b'[[0, true]]', b'[[0, 1.0]]', b'{"0": 1}'],
)
def test_malformed_parity_entries_drop_the_request(parity):
    datagram = encode_repair_request(COOKIE, RepairRequest())[:16] + b'{"v":1,"frames":[],"parity":' + parity + b"}"
    result = decode_repair_request(datagram, cookie=COOKIE, frame_count=100, block_count=8)
    assert isinstance(result, Dropped) and result.reason is DropReason.MALFORMED_METADATA


def fec_planner(layout, received, parity_held):
    return RepairPlanner(layout=layout, received=received, parity_held=parity_held, fec=True)


def test_a_parity_planner_asks_per_block_for_its_passed_missing_frames_net_of_parity_held():
    from array import array

    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout  # 10 blocks of 10 frames
    received = _bits(layout.frame_count)
    held = array("I", bytes(4 * layout.block_count))
    planner = fec_planner(layout, received, held)
    lost = {3, 4, 5, 12, 27, 28, 90}
    for frame in range(0, 100):  # joined at frame 0, position 99
        if frame not in lost:
            received[frame] = 1
        planner.observe_carousel(frame)
    held[2] = 1  # one symbol of block 2 is here already
    planner.poll(0.0, jitter=0.0)  # the first poll only sets the timer
    request = planner.poll(1.0, jitter=0.0)
    # Block 0: 3 missing; block 1: 1; block 2: 2 missing less 1 held; frame 90 is within the reorder margin.
    # Each with the spare (a decode from exactly K symbols fails ~1% of the time).
    assert PARITY_MARGIN == 1
    assert request.ranges == () and request.parity == ((0, 4), (1, 2), (2, 2))
    assert planner.poll(1.15, jitter=0.0) is None  # asked: not again before REREQUEST_AFTER
    assert planner.parity_requested == 8


def test_parity_held_beyond_what_was_asked_stands_in_for_frames_lost_since():
    from array import array

    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=50_000).layout  # 2 blocks of 50 frames
    received = _bits(layout.frame_count)
    held = array("I", bytes(4 * layout.block_count))
    planner = fec_planner(layout, received, held)
    for frame in range(100):
        if frame not in (1, 2):
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(1.0, jitter=0.0).parity == ((0, 3),)  # 2 missing and the spare
    held[0] = 3  # the 3 came; frame 7 is lost meanwhile
    received[7] = 0
    planner.poll(1.1, jitter=0.0)
    assert planner.poll(1.2, jitter=0.0) is None  # 2 symbols answer frames 1-2, the spare stands in for 7
    held[0] = 4  # another receiver needed 4: one more came; frame 8 is lost too
    received[8] = 0
    assert planner.poll(1.3, jitter=0.0) is None  # the fourth stands in for frame 8


def test_the_queue_keeps_per_block_the_largest_count_and_gives_fresh_symbol_ids():
    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout
    queue = RepairQueue(layout=layout, fec=True)
    queue.add(RepairRequest(parity=((3, 2), (5, 1))))
    queue.add(RepairRequest(parity=((3, 3),)))
    queue.add(RepairRequest(parity=((3, 1),)))
    assert queue.parity_need(3) == 3 and queue.parity_pending == 4
    sent = [queue.pop_parity() for _ in range(5)]
    assert sent == [(3, 10), (5, 10), (3, 11), (3, 12), None]  # blocks in turn; ESIs from K = 10
    queue.add(RepairRequest(parity=((3, 2),)))
    assert [queue.pop_parity(), queue.pop_parity()] == [(3, 13), (3, 14)]  # never an ESI again


def test_the_queue_caps_a_count_at_the_blocks_frames_and_ignores_parity_without_fec():
    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout
    queue = RepairQueue(layout=layout, fec=True)
    queue.add(RepairRequest(parity=((0, 500),)))
    assert queue.parity_need(0) == 10
    plain = RepairQueue(layout=layout)
    plain.add(RepairRequest(ranges=((1, 1),), parity=((0, 5),)))
    assert plain.pop_parity() is None and plain.parity_ignored == 5 and plain.pop() == 1


def test_the_carousel_starting_a_block_again_drops_its_parity_need():
    manifest = manifest_of(random.Random(1).randbytes(30_000), frame_size=1000, block_size=10_000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    carousel.next_send(0.0)  # metadata
    for _ in range(5):
        carousel.next_send(0.0)  # frames 0-4
    carousel.request_repair(RepairRequest(parity=((0, 4), (1, 4))))
    actions = [carousel.next_send(0.0) for _ in range(20)]
    parity = [(a.block, a.esi) for a in actions if a.__class__.__name__ == "SendParity"]
    # Block 1's need is dropped once the carousel reaches frame 10; block 0's symbols all go out.
    assert sorted(b for b, _ in parity).count(0) == 4
    assert carousel.repairs.parity_need(1) == 0
    assert carousel.parity_frames_sent == len(parity) < 8


@pytest.mark.parametrize("seed", range(3))
def test_with_parity_lossy_receivers_complete_with_fewer_repair_frames_than_with_frame_repair(seed):
    from .memlink import run_with_repair as run_link

    image = random.Random(seed).randbytes(2_000_000)
    sent = {}
    for fec in (False, True):
        manifest = manifest_of(image, frame_size=1000, block_size=100_000)
        carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=0.05)
        nodes = [MemoryReceiver(cookie=COOKIE) for _ in range(6)]
        run_link(carousel, image, nodes, loss=0.05, rng=random.Random(seed), fec=fec)
        assert all(bytes(node.disk) == image for node in nodes)
        sent[fec] = carousel.repair_frames_sent + carousel.parity_frames_sent
        if fec:
            assert carousel.repair_frames_sent == 0 and carousel.parity_frames_sent > 0
            assert sum(len(node.recovered_blocks) for node in nodes) > 0
            assert all(node.corrupt_blocks_seen == [] for node in nodes)
    assert sent[True] < sent[False] / 2


def test_a_parity_planner_asks_frames_not_symbols_for_a_block_that_refuses_parity():
    from array import array

    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout  # 10 blocks of 10 frames
    received = _bits(layout.frame_count)
    parity_held = array("I", bytes(4 * layout.block_count))
    refused = _bits(layout.block_count)
    refused[1] = 1  # the assembly's: block 1's last parity-decoded copy failed its checksum
    planner = RepairPlanner(layout=layout, received=received, parity_held=parity_held, fec=True, parity_refused=refused)
    for frame in range(0, 100):  # joined at frame 0, position 99
        if frame not in (2, 10, 11):
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    request = planner.poll(1.0, jitter=0.0)
    assert request.parity == ((0, 2),)
    assert request.ranges == ((10, 2),)


def _drain(queue: RepairQueue, now: float) -> list[tuple[int, int]]:
    sent = []
    while (symbol := queue.pop_parity(now)) is not None:
        sent.append(symbol)
    return sent


def test_a_request_crossing_symbols_on_their_way_is_merged_with_them_not_added():
    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout  # K = 10 per block
    queue = RepairQueue(layout=layout, fec=True)
    queue.add(RepairRequest(parity=((3, 8, 0),)), now=0.0)  # receiver A misses 8
    assert _drain(queue, 0.01) == [(3, esi) for esi in range(10, 18)]
    # B missed 7 and asked before A's 8 reached it (it has seen none): they answer B too.
    queue.add(RepairRequest(parity=((3, 7, 0),)), now=0.03)
    assert queue.parity_pending == 0
    # C misses 10, also crossing: the 8 on their way and 2 more.
    queue.add(RepairRequest(parity=((3, 10, 0),)), now=0.04)
    assert _drain(queue, 0.05) == [(3, 18), (3, 19)]
    # D has seen them all (up to ESI 19) and needs 1 more: fresh.
    queue.add(RepairRequest(parity=((3, 1, 20),)), now=0.06)
    assert _drain(queue, 0.07) == [(3, 20)]


def test_symbols_a_receiver_has_not_seen_long_after_they_left_count_as_lost():
    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout
    queue = RepairQueue(layout=layout, fec=True)
    queue.add(RepairRequest(parity=((2, 4, 0),)), now=0.0)
    assert len(_drain(queue, 0.0)) == 4
    # Seen up to ESI 12 (13 and then lost), asking again 0.3 s later for 2: they are not coming.
    queue.add(RepairRequest(parity=((2, 2, 13),)), now=0.3)
    assert _drain(queue, 0.3) == [(2, 14), (2, 15)]


def test_symbols_that_waited_for_the_workers_are_in_flight_from_when_they_left():
    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout
    queue = RepairQueue(layout=layout, fec=True)
    queue.add(RepairRequest(parity=((2, 4, 0),)), now=0.0)
    assert len(_drain(queue, 0.0)) == 4  # handed out at 0.0, but their symbols were made only at 0.4:
    queue.parity_left(2, 0.4)
    # The receiver asks again at 0.45, not having seen them: they are on their way, nothing more is sent.
    queue.add(RepairRequest(parity=((2, 4, 0),)), now=0.45)
    assert queue.parity_pending == 0
    # Long after they left, still not seen: lost, sent anew.
    queue.add(RepairRequest(parity=((2, 4, 0),)), now=0.8)
    assert _drain(queue, 0.8) == [(2, 14), (2, 15), (2, 16), (2, 17)]
    queue.parity_left(2, 0.1)  # an earlier time changes nothing
    queue.add(RepairRequest(parity=((2, 4, 14),)), now=0.85)
    assert queue.parity_pending == 0
    RepairQueue(layout=layout).parity_left(2, 1.0)  # without parity: nothing to note


def test_a_request_saying_a_long_round_trip_takes_symbols_sent_within_it_as_still_on_their_way():
    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout
    queue = RepairQueue(layout=layout, fec=True)
    queue.add(RepairRequest(parity=((2, 4, 0),)), now=0.0)
    assert len(_drain(queue, 0.0)) == 4
    # Another receiver, whose requests take 0.8 s to be answered, asks 0.5 s after they left: merged.
    queue.add(RepairRequest(parity=((2, 3, 0),), round_trip=0.8), now=0.5)
    assert queue.parity_pending == 0
    # Past its round trip: lost at that receiver, sent anew.
    queue.add(RepairRequest(parity=((2, 3, 0),), round_trip=0.8), now=0.9)
    assert queue.parity_pending == 3
    # A round trip is no licence to wait forever: at most REREQUEST_AFTER_LIMIT.
    _drain(queue, 1.0)
    queue.add(RepairRequest(parity=((2, 3, 0),), round_trip=60.0), now=1.0 + REREQUEST_AFTER_LIMIT + 0.01)
    assert queue.parity_pending == 3


def test_the_round_trip_travels_in_every_datagram_of_a_request_and_a_bad_one_drops_it():
    request = RepairRequest(ranges=tuple((10 * i, 1) for i in range(MAX_RANGES_PER_REQUEST + 5)), parity=((0, 3, 0),), round_trip=0.4567)
    datagrams = encode_repair_requests(COOKIE, request)
    assert len(datagrams) == 2
    decoded = [decode_repair_request(datagram, cookie=COOKIE, frame_count=5000, block_count=4) for datagram in datagrams]
    assert [part.round_trip for part in decoded] == [0.457, 0.457]  # whole milliseconds
    assert decode_repair_request(encode_repair_request(COOKIE, RepairRequest()), cookie=COOKIE, frame_count=5000).round_trip is None
    assert decode_repair_request(encode_repair_request(COOKIE, RepairRequest(round_trip=1e6)), cookie=COOKIE, frame_count=5000).round_trip == 60.0
    for bad in (b"-1", b"1.5", b'"x"', b"60001"):
        datagram = encode_repair_request(COOKIE, RepairRequest()).replace(b'"frames":[]', b'"frames":[],"rtt":' + bad)
        assert isinstance(decode_repair_request(datagram, cookie=COOKIE, frame_count=5000), Dropped), bad


def test_requests_that_do_not_say_what_they_saw_are_served_as_before():
    layout = manifest_of(bytes(100_000), frame_size=1000, block_size=10_000).layout
    queue = RepairQueue(layout=layout, fec=True)
    queue.add(RepairRequest(parity=((1, 3),)), now=0.0)
    assert len(_drain(queue, 0.0)) == 3
    queue.add(RepairRequest(parity=((1, 3),)), now=0.01)  # no `seen`: all it asks is new
    assert len(_drain(queue, 0.01)) == 3
    untimed = RepairQueue(layout=layout, fec=True)  # no clock: what a receiver has not seen is lost
    untimed.add(RepairRequest(parity=((1, 3, 0),)))
    assert len(_drain(untimed, 0.0)) == 3
    untimed.add(RepairRequest(parity=((1, 3, 0),)))
    assert untimed.parity_pending == 3


def test_parity_entries_with_what_was_seen_travel_and_bad_ones_are_dropped():
    request = RepairRequest(parity=((0, 3, 0), (2, 1, 757)))
    assert decode_repair_request(encode_repair_request(COOKIE, request), cookie=COOKIE, frame_count=5000, block_count=4).parity == request.parity
    for entry in ([0, 3, -1], [0, 3, 2**24 + 1], [0, 3, 5, 1], [0, 3, "x"]):
        datagram = encode_repair_request(COOKIE, RepairRequest()).replace(b'"frames":[]', b'"frames":[],"parity":[' + str(entry).replace("'", '"').encode() + b"]")
        dropped = decode_repair_request(datagram, cookie=COOKIE, frame_count=5000, block_count=4)
        assert isinstance(dropped, Dropped), entry


def seeing_planner(lost: set[int]) -> tuple[RepairPlanner, bitarray, array]:
    """A parity planner of 3 blocks of 50 frames that says what it has seen, joined at frame 0, with the
    carousel at the last frame and every frame but `lost` received: (planner, received, parity seen)."""
    layout = manifest_of(bytes(150_000), frame_size=1000, block_size=50_000).layout
    received = _bits(layout.frame_count)
    held, seen = array("I", bytes(4 * layout.block_count)), array("I", bytes(4 * layout.block_count))
    planner = RepairPlanner(layout=layout, received=received, parity_held=held, fec=True, parity_seen=seen)
    for frame in range(150):
        if frame not in lost:
            received[frame] = 1
        planner.observe_carousel(frame)
    return planner, received, seen


def test_the_planner_says_what_it_has_seen_of_each_blocks_parity():
    planner, _, seen = seeing_planner({1, 2, 60})
    seen[1] = 55  # symbols up to ESI 54 of block 1 came (and were of no use)
    planner.poll(0.0, jitter=0.0)
    assert planner.poll(1.0, jitter=0.0).parity == ((0, 3, 0), (1, 2, 55))  # missing + the spare, and what it saw


def test_the_wait_before_asking_again_follows_the_round_trips_of_parity_requests():
    planner, received, seen = seeing_planner({1, 60, 61})
    planner.poll(0.0, jitter=0.0)
    assert [entry[0] for entry in planner.poll(1.0, jitter=0.0).parity] == [0, 1]
    assert planner.rerequest_after == REREQUEST_AFTER and planner.round_trip is None
    # Block 0's answer comes 0.9 s later (a loaded sender): the wait grows to 3 round trips (RFC 6298's first
    # sample), capped; block 1's ask at 1.0 still stands.
    seen[0], received[1] = 52, 1  # (and decoded)
    assert planner.poll(1.9, jitter=0.0) is None
    assert planner.round_trip == pytest.approx(0.9) and planner.rerequest_after == pytest.approx(min(3 * 0.9, REREQUEST_AFTER_LIMIT))
    assert planner.poll(2.9, jitter=0.0) is None  # with the fixed 0.3 s, block 1 would have been asked again by now
    request = planner.poll(3.1, jitter=0.0)  # past the wait: asked again, and not timed when answered (Karn)
    assert [entry[0] for entry in request.parity] == [1]
    assert request.round_trip == pytest.approx(0.9)  # said to the sender, for its window of symbols in flight
    seen[1] = 53
    planner.poll(3.25, jitter=0.0)
    assert planner.round_trip == pytest.approx(0.9)


def test_requests_add_what_the_answer_is_likely_to_lose_on_the_way():
    from array import array

    layout = manifest_of(bytes(2_000_000), frame_size=1000, block_size=100_000).layout  # 20 blocks of 100 frames
    received = _bits(layout.frame_count)
    held = array("I", bytes(4 * layout.block_count))
    planner = RepairPlanner(layout=layout, received=received, parity_held=held, fec=True)
    burst = range(1900, 2000)  # the last block lost whole (a stall): not the network's loss, not counted
    for frame in range(layout.frame_count):
        if frame % 100 >= 10 and frame not in burst:  # 10% of every other block lost
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.observe_rest()
    planner.poll(0.0, jitter=0.0)
    request = planner.poll(1.0, jitter=0.0)
    # 19 blocks of 10% move the estimate 1/16 of the way each: 1 - (15/16)**19 of the way to 10%.
    assert planner.loss == pytest.approx(0.1 * (1 - (15 / 16) ** 19))
    counts = [entry[1] for entry in request.parity]
    assert counts[0] == 10 + PARITY_MARGIN  # one block measured when the first was asked for: too little to add one
    assert counts[18] == round(10 / (1 - planner.loss)) + PARITY_MARGIN == 12  # ~10% more, rounded
    assert counts[19] == round(100 / (1 - planner.loss)) + PARITY_MARGIN


def test_fast_answers_keep_the_wait_at_its_floor():
    planner, _, seen = seeing_planner({1})
    planner.poll(0.0, jitter=0.0)
    planner.poll(1.0, jitter=0.0)
    seen[0] = 51
    planner.poll(1.1, jitter=0.0)
    assert planner.round_trip == pytest.approx(0.1) and planner.rerequest_after == pytest.approx(REREQUEST_AFTER)


def test_a_parity_planner_told_to_ask_for_frames_asks_so_for_blocks_that_lost_a_burst_until_the_time_given():
    from array import array

    layout = manifest_of(bytes(150_000), frame_size=1000, block_size=50_000).layout  # 3 blocks of 50 frames
    received = _bits(layout.frame_count)
    planner = fec_planner(layout, received, array("I", bytes(4 * layout.block_count)))
    lost = {1, 2, *range(60, 80)}  # 2 frames of block 0; a burst of 20 (40%) of block 1
    for frame in range(150):
        if frame not in lost:
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.poll(0.0, jitter=0.0)
    assert not planner.due(0.0) and planner.due(1.0)
    planner.ask_frames_until(1.5)  # e.g. its socket overflowed: decoding would slow it further
    request = planner.poll(1.0, jitter=0.0)
    assert request.ranges == ((60, 20),), "the burst as frames"
    assert [entry[:2] for entry in request.parity] == [(0, 3)], "scattered losses still as parity (2 and the spare)"
    received[1] = 1
    later = planner.poll(2.0, jitter=0.0)  # past 1.5 and REREQUEST_AFTER: all as parity again
    assert later.ranges == () and [entry[:2] for entry in later.parity] == [(0, 2), (1, 21)]


def test_a_parity_planner_asks_for_no_more_symbols_than_the_assembly_can_keep_and_for_the_rest_as_frames():
    # An unpaced sender outran a receiver, which lost whole blocks: asked as parity, the symbols beyond the
    # assembly's memory would be dropped on arrival and asked for again, round after round.
    from array import array

    layout = manifest_of(bytes(150_000), frame_size=1000, block_size=50_000).layout  # 3 blocks of 50 frames
    received = _bits(layout.frame_count)
    parity_held = array("I", bytes(4 * layout.block_count))
    parity_held[2] = 10  # 10 symbols of block 2 held already: they take room too
    room = 120 - 10  # an assembly that keeps 120 symbols and holds those 10 (`Assembly.parity_room`)
    planner = RepairPlanner(layout=layout, received=received, parity_held=parity_held, fec=True, parity_room=lambda: room)
    lost = {*range(0, 50), *range(50, 100), *range(100, 140)}  # blocks 0 and 1 whole, 40 frames of block 2
    for frame in range(150):
        if frame not in lost:
            received[frame] = 1
        planner.observe_carousel(frame)
    planner.observe_rest()  # the carousel rests: every frame passed, the last ones too
    planner.poll(0.0, jitter=0.0)
    request = planner.poll(1.0, jitter=0.0)
    # 110 left: block 0 takes 51 (50 and the spare), block 1 51 more (8 left); block 2
    # would take 31 (its 40 less the 10 held, and the spare): more than is left.
    assert [entry[:2] for entry in request.parity] == [(0, 51), (1, 51)]
    assert request.ranges == ((100, 40),), "what no longer fits, as frames"
    unbounded = RepairPlanner(layout=layout, received=received, parity_held=parity_held, fec=True)
    for frame in range(150):
        unbounded.observe_carousel(frame)
    unbounded.observe_rest()
    unbounded.poll(0.0, jitter=0.0)
    assert unbounded.poll(1.0, jitter=0.0).ranges == ()  # without a budget, all as parity
