"""What the benchmarks count on the wire and at the receiver, without a test bed: each tool's full data frame
(header bytes per image byte, the floor under the "physical limit"), and the loopback benchmark's kernel drops
in datagrams rather than GSO batches."""

from __future__ import annotations

import pytest

from benchmarks.harness import HarnessSettings, data_frame, header_overhead_text
from benchmarks.loopback import datagrams_per_batch, kernel_drops_in_datagrams
from benchmarks.peers import peer_data_frame
from benchmarks.vmcast_runner import (
    VMCAST_RATE_FRACTION,
    mtu_filling_payload,
    vmcast_data_frame,
    vmcast_rate_bps,
)


def test_a_vmcast_data_frame_of_1400_bytes_takes_1458_on_the_wire():
    frame = vmcast_data_frame(payload=1400, mtu=1500)
    assert (frame.payload, frame.wire) == (1400, 1400 + 16 + 8 + 20 + 14)  # frame header, UDP, IPv4, Ethernet
    assert frame.ratio == pytest.approx(1.0414, abs=1e-4)


def test_a_vmcast_datagram_larger_than_the_mtu_pays_ip_and_ethernet_headers_per_fragment():
    frame = vmcast_data_frame(payload=8192, mtu=1500)
    fragments = 6  # 8216 bytes after the IP header, 1480 per fragment
    assert frame.wire == 8192 + 16 + 8 + fragments * (20 + 14)


@pytest.mark.parametrize("mtu, payload", [(1500, 1456), (9000, 8952), (1450, 1400)])
def test_the_harness_default_payload_fills_the_mtu_in_multiples_of_8(mtu, payload):
    assert mtu_filling_payload(mtu) == payload
    assert HarnessSettings(mtu=mtu).payload == payload
    frame = vmcast_data_frame(payload=payload, mtu=mtu)
    assert frame.wire == payload + 16 + 8 + 20 + 14  # one IP packet: not fragmented
    assert vmcast_data_frame(payload=payload + 8, mtu=mtu).wire > frame.wire + 8  # 8 more would be fragmented
    assert HarnessSettings(mtu=mtu, payload=1024).payload == 1024  # given: kept


def test_the_vmcast_rate_puts_data_frames_on_the_link_at_the_rate_fraction():
    rate = vmcast_rate_bps(300, payload=1400, mtu=1500, fraction=1.0)
    assert rate * 1458 / 1444 == pytest.approx(300e6, rel=1e-6)  # IP bits/s -> Ethernet bits/s


@pytest.mark.parametrize("tool, payload, wire", [
    ("udpcast", 1456, 1456 + 16 + 8 + 20 + 14),
    ("uftp", 1400, 1400 + 24 + 8 + 20 + 14),
    ("http", 1448, 1500 + 14),
])  # fmt: skip
def test_each_peer_data_frame_counts_its_own_header_and_the_stack_below(tool, payload, wire):
    frame = peer_data_frame(tool, mtu=1500)
    assert (frame.payload, frame.wire) == (payload, wire)


def test_the_harness_header_line_gives_every_tool_its_floor_over_the_physical_limit():
    settings = HarnessSettings(size_mib=1024, rate_mbit=300.0, tools=["vmcast", "udpcast", "uftp", "http"])
    line = header_overhead_text(settings)
    limit = 1024 * (1 << 20) * 8 / 300e6  # 28.63 s
    for tool in settings.tools:
        frame = data_frame(tool, settings)
        assert f"{tool} {frame.wire}/{frame.payload} = {frame.ratio:.3f} -> {limit * frame.ratio:.2f}s" in line
    if VMCAST_RATE_FRACTION != 1.0:
        assert f"({limit * 1458 / 1400 / VMCAST_RATE_FRACTION:.2f}s at its {VMCAST_RATE_FRACTION:g} pacing)" in line


def test_kernel_drops_are_datagrams_already_when_each_queued_packet_was_one():
    no_gro = {"kernel_drops": 7, "gro": False, "coalesced": 0}
    assert kernel_drops_in_datagrams(no_gro, payload=1400, rate="0", gso=True) == (7, True)
    never_coalesced = {"kernel_drops": 7, "gro": True, "coalesced": 0}
    assert kernel_drops_in_datagrams(never_coalesced, payload=1400, rate="0", gso=True) == (7, True)
    no_gso = {"kernel_drops": 7, "gro": True, "coalesced": 3}
    assert kernel_drops_in_datagrams(no_gso, payload=1400, rate="0", gso=False) == (7, True)


def test_kernel_drops_of_whole_gso_batches_count_every_datagram_a_batch_can_hold():
    batched = {"kernel_drops": 3, "gro": True, "coalesced": 1000}
    assert datagrams_per_batch(payload=1400, rate="0") == 45  # 65,000 bytes of 1416-byte datagrams
    assert kernel_drops_in_datagrams(batched, payload=1400, rate="0", gso=True) == (3 * 45, False)
    assert kernel_drops_in_datagrams(dict(batched, kernel_drops=0), payload=1400, rate="0", gso=True) == (0, True)
    assert kernel_drops_in_datagrams({"kernel_drops": None}, payload=1400, rate="0", gso=True) == (None, False)
