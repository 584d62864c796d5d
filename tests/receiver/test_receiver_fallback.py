"""The HTTP fallback against the real server: when multicast never arrives, and in the end game."""

from __future__ import annotations

import fcntl
import socket
import struct

import pytest

from .real_server import (
    log_tail,
    pause,
    receiver_result,
    sha1_of,
    start_receiver,
    wait_until_sent,
)

SIOCGIFADDR = 0x8915


def another_local_address() -> str | None:
    """An IPv4 address of this host on an interface other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            if name == "lo":
                continue
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            address = socket.inet_ntoa(answer[20:24])
            if not address.startswith("127."):
                return address
    return None


def test_a_receiver_that_multicast_cannot_reach_fetches_the_image_by_http_and_verifies_it(tmp_path, real_server):
    # The server sends on loopback; a receiver that joins the group on another interface never hears it
    # (the kernel gives a group's datagrams to sockets that joined it on the interface they arrive on).
    elsewhere = another_local_address()
    if elsewhere is None:
        pytest.skip("needs an IPv4 interface besides loopback to join on")
    output, log = tmp_path / "out.raw", tmp_path / "receiver.log"
    receiver = start_receiver("unreachable.raw", "--server", real_server.url, "--output", str(output), "--interface", elsewhere, "--fallback-after", "1", log=log)
    code, summary = receiver_result(receiver, timeout=60)
    assert code == 0, log_tail(log)
    assert summary["sha1"] == real_server.sha1["unreachable.raw"] == sha1_of(output)
    assert summary["interface"] == elsewhere
    assert summary["fallback_reason"] == "no_multicast"
    assert summary["fallback_blocks"] == 8 and summary["fallback_bytes"] == 8 << 20
    assert summary["duplicates"] == 0 and summary["repair_requests"] == 0
    assert "nothing of the stream arrived by multicast within 1 s" in log.read_text()


def test_the_last_few_blocks_still_missing_after_a_whole_loop_are_fetched_by_http(tmp_path, real_server):
    output, log = tmp_path / "out.raw", tmp_path / "receiver.log"
    # No repair requests: what the pause loses would otherwise come again half a loop after the first one.
    receiver = start_receiver("endgame.raw", "--server", real_server.url, "--output", str(output), "--rcvbuf", "64k", "--no-repair", log=log)
    wait_until_sent(real_server.url, "endgame.raw", 0.5, 16 << 20)
    pause(receiver, 0.2)
    code, summary = receiver_result(receiver, timeout=60)
    assert code == 0, log_tail(log)
    assert summary["sha1"] == real_server.sha1["endgame.raw"] == sha1_of(output)
    assert summary["kernel_drops"] > 0, "the pause lost nothing: the test did not test the end game"
    assert summary["fallback_reason"] == "endgame" and 0 < summary["fallback_blocks"] <= 16
    assert summary["repair_requests"] == 0
    assert "end game" in log.read_text()
