"""Repair requests against the real server (`vmcast serve`), with real kernel drops."""

from __future__ import annotations

from array import array

from bitarray import bitarray
from vmcast.protocol.repair import REREQUEST_AFTER, REREQUEST_AFTER_LIMIT

from .real_server import (
    RATE_BPS,
    log_tail,
    loop_seconds,
    pause,
    receiver_result,
    sha1_of,
    start_receiver,
    stream_status,
    wait_for_line,
    wait_until_sent,
)


def test_a_receiver_that_lost_frames_asks_for_them_and_finishes_about_when_the_first_loop_ends(tmp_path, real_server):
    size = 16 << 20
    loop = loop_seconds(size, RATE_BPS)
    output, log = tmp_path / "out.raw", tmp_path / "receiver.log"
    # A 64 KiB buffer (the kernel makes it 128 KiB) holds a few dozen datagrams: a 0.2 s pause loses ~800.
    receiver = start_receiver("repair.raw", "--server", real_server.url, "--output", str(output), "--rcvbuf", "64k", "--no-fallback", log=log)
    stream_id = wait_until_sent(real_server.url, "repair.raw", 0.5, size)["stream_id"]
    # Frames are asked for once the carousel passed them since the receiver began following it, which it
    # does from the first metadata frame it hears (once a second; with this small buffer, a loaded machine
    # may lose one): pause only then, or the frames lost would wait for the next loop, as they should.
    wait_for_line(log, "carousel frames come from port")
    pause(receiver, 0.2)
    code, summary = receiver_result(receiver, timeout=60)
    assert code == 0, log_tail(log)
    stream = stream_status(real_server.url, stream_id)  # stopped by now (its one lease was released), counters kept
    assert summary["sha1"] == real_server.sha1["repair.raw"] == sha1_of(output)
    assert summary["kernel_drops"] > 0, "the pause lost nothing: the test did not test repairs"
    assert summary["repair_requests"] > 0 and stream["repair_requests"] > 0
    # The stream offers parity (the default): one stall is repaired with parity like any loss (a receiver
    # asks for frames only when its socket keeps overflowing: the test below).
    assert stream["fec"] == "raptorq"
    assert summary["repair_parity_requested"] > 0 and stream["parity_frames_sent"] > 0
    # Its requests were answered and timed; the wait before asking again is at least the floor.
    assert 0 < summary["repair_round_trip_seconds"] < REREQUEST_AFTER_LIMIT
    assert REREQUEST_AFTER <= summary["repair_wait_seconds"] <= REREQUEST_AFTER_LIMIT
    assert "keeps overflowing" not in log.read_text()
    assert summary["corrupt_blocks"] == 0
    assert summary["fallback_blocks"] == 0
    # Without repairs the lost frames come again only in the second loop, after the half of it that the
    # receiver already holds: ~50% of the frames again, as duplicates (measured: 1.75 loops in all). With
    # them the receive ends about when the first loop does (measured: 1.1 loops), with next to no duplicates.
    # Counted in frames rather than seconds, so that a loaded machine (a sender slower than its rate) does
    # not change the verdict; the time is checked loosely.
    frames = -(-size // 1400)
    assert summary["duplicates"] < 0.2 * frames, f"{summary['duplicates']} duplicates of {frames} frames: {log_tail(log)}"
    assert summary["seconds"] < 1.9 * loop, f"{summary['seconds']:.2f} s for a {loop:.2f} s loop: {log_tail(log)}"


def test_only_a_socket_that_keeps_overflowing_makes_the_receiver_ask_for_lost_blocks_as_frames():
    # Real planner, real request datagrams over loopback UDP. The overflow count is the one input that cannot
    # be made on demand (it is the kernel's), so the test feeds it.
    import socket

    from vmcast.protocol import decode_repair_request, manifest_of
    from vmcast.receiver.repair import SUSTAINED_OVERFLOW, RepairAddress, Repairs

    layout = manifest_of(bytes(150_000), frame_size=1000, block_size=50_000).layout  # 3 blocks of 50 frames
    held = bitarray(layout.frame_count)
    held.setall(1)
    held[60:80] = 0  # a burst: 40% of block 1
    # Read before each request: 0; 5 (grew once: a stall); 5; then growing at every request.
    counts = iter([0, 5, 5, *range(10, 10 + SUSTAINED_OVERFLOW)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        repairs = Repairs(cookie=b"12345678", address=RepairAddress(host="127.0.0.1", port=server.getsockname()[1]), sock=client)
        repairs.start(layout=layout, held=held, parity_held=array("I", bytes(12)), fec=True, overflows=lambda: next(counts))
        for frame in range(150):
            repairs.planner.observe_carousel(frame)
        repairs.poll(0.0)  # the planner's first poll only sets its clock
        asked = []
        for step in range(1, 4 + SUSTAINED_OVERFLOW):
            repairs.poll(float(step))  # 1 s apart: past the planner's interval and its re-request delay
            request = decode_repair_request(server.recv(2048), cookie=b"12345678", frame_count=150, block_count=3)
            asked.append("frames" if request.ranges else "parity")
    assert asked == ["parity"] * (2 + SUSTAINED_OVERFLOW) + ["frames"], asked


def test_a_receiver_behind_its_socket_asks_only_once_caught_up_or_after_the_stale_interval():
    # Real planner, real request datagrams over loopback UDP; the clock is the test's. Behind, the lost frames
    # may be queued in the socket already: asking then would have the sender send them twice.
    import socket

    from vmcast.protocol import decode_repair_request, manifest_of
    from vmcast.receiver.repair import STALE_POLL_INTERVAL, RepairAddress, Repairs

    layout = manifest_of(bytes(150_000), frame_size=1000, block_size=50_000).layout  # 3 blocks of 50 frames
    held = bitarray(layout.frame_count)
    held.setall(1)
    held[10:12] = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        repairs = Repairs(cookie=b"12345678", address=RepairAddress(host="127.0.0.1", port=server.getsockname()[1]), sock=client)
        repairs.start(layout=layout, held=held, parity_held=array("I", bytes(12)), fec=False)
        for frame in range(150):
            repairs.planner.observe_carousel(frame)

        def requests_at(now: float, *, behind: bool) -> int:
            repairs.poll(now, behind=behind)
            sent = 0
            while True:
                try:
                    request = decode_repair_request(server.recv(2048), cookie=b"12345678", frame_count=150, block_count=3)
                except BlockingIOError:
                    return sent
                assert request.frame_count == 2  # frames 10 and 11
                sent += 1

        assert requests_at(0.0, behind=False) == 0  # the planner's first poll only sets its clock
        # Behind from here on: due by the planner's clock, but not asked before the stale interval has passed.
        assert requests_at(0.3, behind=True) == 0
        assert requests_at(STALE_POLL_INTERVAL - 0.01, behind=True) == 0
        assert requests_at(STALE_POLL_INTERVAL + 0.01, behind=True) == 1
        # Caught up: asked as soon as the planner says (its re-request delay has passed).
        assert requests_at(STALE_POLL_INTERVAL + 1.0, behind=False) == 1
