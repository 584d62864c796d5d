"""The receive buffer asked for by default: a share of the memory the receiver may use (machine or cgroup v2),
and the warning when the kernel grants less.

The cgroup trees here are directories made in tmp_path with the files the kernel shows (``/proc/self/cgroup``
and ``memory.max``): a test cannot put itself into a memory-limited cgroup on every machine. The sockets and
the receiver processes are real; the one without CAP_NET_ADMIN is started by ``setpriv`` (util-linux).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmcast.receiver.multicast import (
    RECEIVE_BUFFER_LARGEST,
    RECEIVE_BUFFER_MAX,
    RECEIVE_BUFFER_MIN,
    RECEIVE_BUFFER_SHARE,
    auto_receive_buffer,
    open_group_socket,
    usable_memory,
)

GiB = 1 << 30
MACHINE = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cgroup_tree(root, own: str, limits: dict[str, str]):
    """A cgroup v2 tree under `root` with `limits` ({relative path: memory.max}), and a /proc/self/cgroup."""
    for path, limit in limits.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "memory.max").write_text(f"{limit}\n")
    (root / own.strip("/")).mkdir(parents=True, exist_ok=True)
    own_cgroup = root.parent / "cgroup"
    own_cgroup.write_text(f"0::{own}\n")
    return {"cgroup_root": root, "own_cgroup": own_cgroup}


def test_the_share_of_memory_is_bounded_both_ways():
    assert auto_receive_buffer(memory=2 * GiB) == RECEIVE_BUFFER_MIN
    assert auto_receive_buffer(memory=16 * GiB) == 16 * GiB // RECEIVE_BUFFER_SHARE == 512 << 20
    assert auto_receive_buffer(memory=256 * GiB) == RECEIVE_BUFFER_MAX


def test_the_lowest_limit_of_the_cgroup_and_its_ancestors_counts(tmp_path):
    tree = cgroup_tree(tmp_path / "fs", "/system.slice/vmcast.service", {"system.slice": str(4 * GiB), "system.slice/vmcast.service": "max"})
    assert usable_memory(**tree) == min(MACHINE, 4 * GiB)
    tree = cgroup_tree(tmp_path / "fs2", "/a/b", {"a": "max", "a/b": str(GiB)})
    assert usable_memory(**tree) == min(MACHINE, GiB)


def test_no_limit_or_no_unified_tree_means_the_machine(tmp_path):
    assert usable_memory(**cgroup_tree(tmp_path / "fs", "/", {})) == MACHINE
    v1 = tmp_path / "v1"
    v1.write_text("12:memory:/docker/abc\n")
    assert usable_memory(cgroup_root=tmp_path / "fs", own_cgroup=v1) == MACHINE
    assert usable_memory(cgroup_root=tmp_path / "fs", own_cgroup=tmp_path / "absent") == MACHINE


def test_a_socket_without_a_size_gets_the_automatic_one_as_far_as_the_kernel_allows():
    # Linux doubles what is asked; without root it caps at net.core.rmem_max, so compare with what a socket
    # asked for the same size explicitly gets.
    group_socket = open_group_socket(group="239.255.77.1", port=0, interface="127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as explicit:
            try:
                explicit.setsockopt(socket.SOL_SOCKET, 33, auto_receive_buffer())  # SO_RCVBUFFORCE
            except OSError:
                explicit.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, auto_receive_buffer())
            assert group_socket.rcvbuf == explicit.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert group_socket.rcvbuf > 2 * 212992, "more than the kernel's default"
    finally:
        group_socket.sock.close()


def receive_nothing(tmp_path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`vmcast receive` on a group nobody sends to, for one second: it joins, says so, and exits 6."""
    command = [*prefix, sys.executable, "-m", "vmcast.receiver", "--group", "239.255.77.2", "--port", "45998", "--cookie", "00112233445566ff",
               "--output", str(tmp_path / "out.raw"), "--interface", "127.0.0.1", "--timeout", "1", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: CAP_NET_ADMIN lets the receiver pass net.core.rmem_max")
def test_a_receiver_granted_what_it_asked_says_nothing_of_rmem_max(tmp_path):
    result = receive_nothing(tmp_path)
    assert result.returncode == 6, result.stderr
    assert "joined 239.255.77.2:45998" in result.stderr
    assert "rmem_max" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop CAP_NET_ADMIN")
def test_a_receiver_capped_by_rmem_max_says_so_and_how_to_raise_it(tmp_path):
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    if rmem_max >= RECEIVE_BUFFER_LARGEST:
        pytest.skip("net.core.rmem_max is at least the largest buffer the kernel grants: nothing caps it")
    result = receive_nothing(tmp_path, "--rcvbuf", "1g", prefix=("setpriv", "--inh-caps=-all", "--bounding-set=-net_admin"))
    assert result.returncode == 6, result.stderr
    assert f"granted a receive buffer of {rmem_max} bytes, not the {RECEIVE_BUFFER_LARGEST} asked" in result.stderr
    assert f"sysctl -w net.core.rmem_max={RECEIVE_BUFFER_LARGEST}" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: CAP_NET_ADMIN lets the receiver pass net.core.rmem_max")
def test_the_largest_buffer_is_granted_whole_and_not_taken_for_capped(tmp_path):
    # 1g is one byte over what the kernel grants (INT_MAX / 2); asked as is, the receiver would warn of a cap
    # that is the kernel's own limit. (2g, before, did not fit the system call's int and crashed it.)
    result = receive_nothing(tmp_path, "--rcvbuf", "1g")
    assert result.returncode == 6, result.stderr
    assert f"receive buffer {2 * RECEIVE_BUFFER_LARGEST} bytes" in result.stderr
    assert "rmem_max" not in result.stderr
