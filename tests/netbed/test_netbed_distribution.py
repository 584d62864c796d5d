"""End to end on the network-namespace test bed: `vmcast serve` on one host, `vmcast receive` on three or
four others, real multicast over a rate-limited bridge with real kernel-level loss.

Every case ends the same way: every receiver exits 0, its JSON summary says verified with the image's
SHA-1, and the file it wrote hashes to that SHA-1. Links run at `LINK_MBIT` and the server at `SEND_RATE`
(below the link, so tbf never drops; loss comes only from the bed's nft rule), so a 32 MiB loop takes
about 2.8 s and two cores are not the bottleneck.

Needs root and `ip netns`; skipped otherwise, with the reason.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

# Imported under another name: pytest would collect a module-level `testbed_available` as a test.
from benchmarks.testbed import testbed_available as _testbed_available

from .bed_helpers import (
    FRAME_PAYLOAD,
    PARITY_ASKER_SCRIPT,
    RELAY_SCRIPT,
    Bed,
    Receiver,
    ReceiverOutcome,
    assert_verified,
    loop_seconds,
    netbed,
    run_seed,
    sha1_of,
    wait_until,
)
from .conftest import Image

_available, _reason = _testbed_available()
if not _available:
    pytest.skip(_reason, allow_module_level=True)

pytestmark = pytest.mark.netns

# A data datagram on the wire as `bytes_sent` counts it: the frame header and the payload.
FRAME_HEADER = 16


def _assert_all_verified(
    receivers: list[Receiver], outcomes: list[ReceiverOutcome], image: Image, *, context: str = ""
) -> None:
    for receiver, outcome in zip(receivers, outcomes, strict=True):
        assert_verified(outcome, receiver.output, image.sha1, context=context)


# -- 1. loss ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_percent", "timeout", "fec"),
    [(0.0, 60.0, False), (2.0, 90.0, True), (10.0, 180.0, False)],
    ids=["no-loss", "2pct-loss-parity", "10pct-loss-frames"],
)
def test_every_receiver_ends_with_a_verified_identical_copy_under_udp_loss(
    image: Image, tmp_path, loss_percent: float, timeout: float, fec: bool
) -> None:
    with netbed(tmp_path, receiver_loss=[loss_percent] * 3) as bed:
        bed.serve(image.directory, "--fec" if fec else "--no-fec")
        receivers = [bed.receiver(index, image.name).start() for index in range(3)]
        [stream] = wait_until(bed.streams, timeout=30, what="the stream to start")
        outcomes = [receiver.wait(timeout=timeout) for receiver in receivers]
        stream = bed.stream(stream["stream_id"])  # stopped or stopping by now: its counters stay
    _assert_all_verified(receivers, outcomes, image)
    # With --fec lost frames come back as parity, which each receiver decodes; without, as the frames.
    assert stream["fec"] == ("raptorq" if fec else None), stream
    if loss_percent and not fec:
        assert stream["repair_frames_sent"] > 0 and stream["parity_frames_sent"] == 0, stream
    if loss_percent and fec:
        assert stream["parity_frames_sent"] > 0, stream
        for outcome in outcomes:
            assert outcome.summary["recovered_blocks"] > 0, outcome.describe()
            assert outcome.summary["corrupt_blocks"] == 0, outcome.describe()


def test_receivers_started_together_with_min_receivers_share_one_loop_across_the_bridge(image: Image, tmp_path) -> None:
    # Started a second apart (a third of a loop), as machines booting together are. Each says it joined
    # (POST /v1/leases/{id}/joined) from its own namespace; the stream holds, sending only metadata, until all
    # three have, then sends the image once: no receiver needs the wrap or a repair.
    frames = -(-image.length // 1400)
    with netbed(tmp_path, receiver_loss=[0.0] * 3) as bed:
        bed.serve(image.directory)
        receivers = []
        for index in range(3):
            receivers.append(bed.receiver(index, image.name, "--min-receivers", "3", "--max-wait", "60").start())
            time.sleep(1.0)
        [stream] = wait_until(bed.streams, timeout=30, what="the stream to start")
        outcomes = [receiver.wait(timeout=60) for receiver in receivers]
        stream = bed.stream(stream["stream_id"])
    _assert_all_verified(receivers, outcomes, image)
    assert stream["waiting_for"] == 0 and stream["repair_frames_sent"] == 0, stream
    # One loop and its metadata (a round of a few frames a second), nothing of a second loop.
    assert frames <= stream["datagrams_sent"] < frames * 1.02 + 100, (stream["datagrams_sent"], frames)


# -- 2. a receiver killed and restarted ---------------------------------------------------------------------------


def test_a_receiver_killed_with_sigkill_mid_transfer_and_started_again_ends_verified(image: Image, tmp_path) -> None:
    rate = "50mbit"  # a loop of ~5.5 s: time for the victim to save a checkpoint (every 2 s) and still be mid-loop
    loop = loop_seconds(image.length, 50e6)
    with netbed(tmp_path, receiver_loss=[0.0, 2.0, 0.0]) as bed:
        # A short TTL: the killed run's lease (never released) expires during the test.
        bed.serve(image.directory, "--lease-ttl", "10", rate=rate)
        receivers = [bed.receiver(index, image.name).start() for index in range(3)]
        victim = receivers[0]  # no loss: it holds whole, verified blocks when it dies
        # Killed once its state file says it verified something (so a resume has something to keep), or
        # after half a loop if it never says so (a receiver without resume).
        bed.wait_for_stream(sent_fraction=0.2, image_bytes=image.length, timeout=30)
        deadline = time.monotonic() + 0.5 * loop
        while victim.verified_blocks_saved() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert victim.running(), "the victim finished before it could be killed mid-transfer"
        killed = victim.kill()
        assert killed.exit_code == -signal.SIGKILL, killed.describe()
        saved = victim.verified_blocks_saved()
        victim.start()  # the very same command line
        outcomes = [receiver.wait(timeout=90) for receiver in receivers]
    _assert_all_verified(receivers, outcomes, image)
    restarted = outcomes[0]
    # Resume after SIGKILL (the state file <output>.vmcast.json) is landing in the receiver; once its
    # summary reports what it kept, the restart must have kept something. Until then only the end counts.
    if "resumed_blocks" in restarted.summary:
        assert restarted.summary["resumed_blocks"] > 0, (
            f"state file had {saved} verified blocks\n{restarted.describe()}"
        )


# -- 3. the server killed and restarted ---------------------------------------------------------------------------

# Longer than two lease renewals (every third of the 6 s TTL), far shorter than the receivers' --timeout (30 s):
# they must keep listening, and tolerate failed renewals, until the server is back.
SERVER_DOWN_SECONDS = 5.0
SERVER_LEASE_TTL = "6"


def test_receivers_ride_out_a_server_killed_with_sigkill_and_restarted_without_starting_over(
    image: Image, tmp_path
) -> None:
    with netbed(tmp_path, receiver_loss=[0.0, 0.0, 2.0]) as bed:
        server = bed.serve(image.directory, "--lease-ttl", SERVER_LEASE_TTL)
        receivers = [bed.receiver(index, image.name).start() for index in range(3)]
        wait_until(lambda: bed.streams() and bed.streams()[0]["references"] == 3, timeout=30, what="three leases")
        before = bed.wait_for_stream(sent_fraction=0.4, image_bytes=image.length, timeout=30)
        server.kill()
        time.sleep(SERVER_DOWN_SECONDS)
        for receiver in receivers:
            assert receiver.running(), f"{receiver.name} gave up while the server was down"
        server.start()  # same command line: same port, --cache-dir and state database
        after = bed.streams()
        assert [(s["stream_id"], s["group"], s["port"], s["cookie"]) for s in after] == [
            (before["stream_id"], before["group"], before["port"], before["cookie"])
        ], "the stream resumes on the same group, port and cookie"
        outcomes = [receiver.wait(timeout=90) for receiver in receivers]
        stream_id = before["stream_id"]
        bed.wait_for_all_streams_stopped([stream_id], timeout=15)
    _assert_all_verified(receivers, outcomes, image)
    # The carousel starts again at offset 0 after a restart. A receiver that kept what it had holds those
    # frames already: they come as duplicates. One that started over would take them anew (no duplicates,
    # at least on a loss-free link where one loop suffices).
    frames_before_kill = before["bytes_sent"] // (FRAME_PAYLOAD + FRAME_HEADER)
    for outcome in outcomes:
        assert outcome.summary["duplicates"] >= frames_before_kill // 2, (
            f"{outcome.name} holds fewer than half of the ~{frames_before_kill} frames sent before the kill "
            f"as duplicates after the restart: it started over\n{outcome.describe()}"
        )


# -- 4. joining and leaving at random -----------------------------------------------------------------------------


def test_receivers_joining_and_leaving_at_random_all_end_verified_and_then_the_stream_stops(
    image: Image, tmp_path
) -> None:
    seed = run_seed()
    rng = random.Random(seed)
    loop = loop_seconds(image.length)
    with netbed(tmp_path, receiver_loss=[0.0, 1.0, 5.0, 2.0]) as bed:
        bed.serve(image.directory, "--lease-ttl", "10")
        receivers = [bed.receiver(index, image.name) for index in range(4)]
        # The 5 % receiver needs several loops, so it is surely still receiving when it is interrupted: some
        # time after it joined the group (a process still importing is not "midway"), and started again later.
        quitter = receivers[2]
        start_at = {receiver: rng.uniform(0.0, loop) for receiver in receivers}
        quit_after_join = rng.uniform(0.5, loop)
        again_after_quit = rng.uniform(0.5, loop)
        context = (
            f"seed {seed} (VMCAST_NETBED_SEED reproduces it): starts at "
            + ", ".join(f"{r.host.name} {at:.2f} s" for r, at in start_at.items())
            + f"; {quitter.host.name} interrupted {quit_after_join:.2f} s after it joined, started again"
            f" {again_after_quit:.2f} s later"
        )

        stream_ids: set[str] = set()
        interrupted: ReceiverOutcome | None = None
        joined_at = interrupted_at = None
        began = time.monotonic()
        pending = set(receivers)
        while pending or interrupted_at is None or quitter.runs < 2:
            now = time.monotonic() - began
            for receiver in [r for r in pending if now >= start_at[r]]:
                pending.discard(receiver)
                receiver.start()
            if joined_at is None and quitter.runs == 1 and quitter.has_logged("joined "):
                joined_at = now
            if interrupted is None and joined_at is not None and now >= joined_at + quit_after_join:
                assert quitter.running(), (
                    f"{quitter.name} was no longer receiving when it was to be interrupted; {context}"
                )
                interrupted, interrupted_at = quitter.interrupt(), now
            if interrupted_at is not None and quitter.runs == 1 and now >= interrupted_at + again_after_quit:
                quitter.start()  # the very same command line
            stream_ids.update(stream["stream_id"] for stream in bed.streams())
            assert now < 60, f"the schedule did not play out; {context}"
            time.sleep(0.05)
        outcomes = [receiver.wait(timeout=120) for receiver in receivers]
        # Every receiver released its lease on the way out: the leases reach zero and the stream stops.
        bed.wait_for_all_streams_stopped(sorted(stream_ids), timeout=15)

    assert interrupted is not None
    assert interrupted.exit_code == 130, f"{context}\n{interrupted.describe()}"
    assert interrupted.summary.get("verified") is False and interrupted.summary.get("exit_code") == 130, context
    _assert_all_verified(receivers, outcomes, image, context=context)


# -- 5. corruption in flight --------------------------------------------------------------------------------------

# The receivers' group, fed by the corrupting relay; outside the server's own range (239.255.0.0/16).
RELAY_GROUP = "239.213.1.1"
CORRUPT_SHARE = 0.001


def _start_relay(bed: Bed, lease: dict, *, seed: int, corruption: Sequence[str]) -> subprocess.Popen:
    """The corrupting relay on the sender: from the server's group on its loopback onto RELAY_GROUP over the
    bed, corrupting as `corruption` (relay options) says; returned once it said it is ready."""
    relay_argv = [
        sys.executable, str(RELAY_SCRIPT), "--from-group", lease["group"], "--from-interface", "127.0.0.1",
        "--port", str(lease["port"]), "--to-group", RELAY_GROUP, "--to-interface", bed.sender.address,
        *corruption, "--seed", str(seed),
    ]  # fmt: skip
    relay = bed.start_on_sender(relay_argv, stdout=subprocess.PIPE, text=True)
    assert relay.stdout.readline().strip() == "ready", "the relay did not start"
    return relay


def _relay_receivers(bed: Bed, lease: dict, count: int) -> list[Receiver]:
    """`count` receivers joined to the relay's group without a server (so they ask for nothing), started."""
    return [
        bed.group_receiver(index, group=RELAY_GROUP, port=lease["port"], cookie=lease["cookie"]).start()
        for index in range(count)
    ]


def test_datagrams_corrupted_in_flight_are_detected_taken_again_and_never_reported_good(image: Image, tmp_path) -> None:
    seed = run_seed()
    with netbed(tmp_path, receiver_loss=[0.0, 0.0, 1.0]) as bed:
        # The server streams to its group on the sender's loopback only (so it costs no bed bandwidth); the
        # relay, on the same host, hears it there and multicasts it on to RELAY_GROUP over the bed. Nobody
        # renews the test's lease: a long TTL keeps the stream up, and the test releases it at the end.
        bed.serve(image.directory, "--lease-ttl", "600", interface="127.0.0.1")
        lease = bed.start_stream(image.name)
        relay = _start_relay(bed, lease, seed=seed, corruption=["--corrupt", str(CORRUPT_SHARE)])
        receivers = _relay_receivers(bed, lease, 3)
        outcomes = [receiver.wait(timeout=120) for receiver in receivers]
        relay.send_signal(signal.SIGINT)
        relay_out, _ = relay.communicate(timeout=10)
        bed.release(lease["lease_id"])
    counts = json.loads(relay_out.strip().splitlines()[-1])
    context = f"relay seed {seed} (VMCAST_NETBED_SEED reproduces its choices), relay counts {counts}"
    assert counts["corrupted"] > 0, context
    for receiver, outcome in zip(receivers, outcomes, strict=True):
        # First the safety property, whatever else happened: nothing reported good is wrong.
        if outcome.summary.get("verified") is True or outcome.exit_code == 0:
            assert sha1_of(receiver.output) == image.sha1, (
                f"a wrong image reported good; {context}\n{outcome.describe()}"
            )
    for receiver, outcome in zip(receivers, outcomes, strict=True):
        assert_verified(outcome, receiver.output, image.sha1, context=context)
        assert outcome.summary["corrupt_blocks"] > 0, f"corruption went unnoticed; {context}\n{outcome.describe()}"


# -- 6. parity corrupted in flight ---------------------------------------------------------------------------------

# A share of parity frames the relay corrupts: a decode of a 2-5 % receiver uses 15-40 symbols (what its block
# lacks), so about half of them use a corrupted one: wrong blocks are many, and they must all be caught.
PARITY_CORRUPT_SHARE = 0.05


def test_parity_corrupted_in_flight_decodes_to_wrong_blocks_that_are_caught_and_never_reported_good(
    image: Image, tmp_path
) -> None:
    seed = run_seed()
    with netbed(tmp_path, receiver_loss=[2.0, 5.0]) as bed:
        # As in the corruption case above: the server on the sender's loopback, the relay onto the bed; the
        # receivers there join the relay's group without a server, so they ask for nothing: a stand-in asks
        # the server for parity of every block, over and over, and the relay corrupts some of it.
        bed.serve(image.directory, "--lease-ttl", "600", "--fec", interface="127.0.0.1")
        lease = bed.start_stream(image.name)
        assert lease["fec"] == "raptorq", lease
        relay = _start_relay(bed, lease, seed=seed, corruption=["--corrupt", "0", "--corrupt-parity", str(PARITY_CORRUPT_SHARE)])
        blocks = -(-lease["len"] // lease["block_size"])
        asker_argv = [
            sys.executable, str(PARITY_ASKER_SCRIPT), "--server", bed.sender.address, "--repair-port",
            str(lease["repair_port"]), "--cookie", lease["cookie"], "--blocks", str(blocks), "--count", "48",
            # Once the carousel passed every block (the receivers then miss 2-5 % of each), twice: blocks whose
            # decode was wrong and that were forgotten get parity again, which the receivers refuse for those
            # blocks (docs/PROTOCOL.md section 8, "Suspect parity"); the carousel's data completes them.
            "--delay", str(1.5 * loop_seconds(image.length)), "--rounds", "2", "--every", "1.5",
        ]  # fmt: skip
        asker = bed.start_on_sender(asker_argv, stdout=subprocess.PIPE, text=True)
        assert asker.stdout.readline().strip() == "ready", "the parity asker did not start"
        receivers = _relay_receivers(bed, lease, 2)
        outcomes = [receiver.wait(timeout=120) for receiver in receivers]
        for helper in (asker, relay):
            helper.send_signal(signal.SIGINT)
        asker.communicate(timeout=10)
        relay_out, _ = relay.communicate(timeout=10)
        stream = bed.stream(lease["stream_id"])
        bed.release(lease["lease_id"])
    counts = json.loads(relay_out.strip().splitlines()[-1])
    context = f"relay seed {seed} (VMCAST_NETBED_SEED reproduces its choices), relay counts {counts}"
    assert counts["parity_corrupted"] > 0 and counts["corrupted"] == 0, context
    assert stream["parity_frames_sent"] > 0, stream
    for receiver, outcome in zip(receivers, outcomes, strict=True):
        # The safety property first: nothing reported good is wrong.
        if outcome.summary.get("verified") is True or outcome.exit_code == 0:
            assert sha1_of(receiver.output) == image.sha1, f"wrong image reported good; {context}\n{outcome.describe()}"
    for receiver, outcome in zip(receivers, outcomes, strict=True):
        assert_verified(outcome, receiver.output, image.sha1, context=context)
        assert outcome.summary["recovered_blocks"] > 0, f"nothing decoded from parity; {context}\n{outcome.describe()}"
    # Data frames were never corrupted: every corrupt block was a decode from a corrupted symbol, caught.
    assert sum(outcome.summary["corrupt_blocks"] for outcome in outcomes) > 0, f"no corrupt symbol was used; {context}"
