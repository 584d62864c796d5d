"""The receive buffer asked for by default: a share of the memory the receiver may use (machine or cgroup v2).

The cgroup trees here are directories made in tmp_path with the files the kernel shows (``/proc/self/cgroup``
and ``memory.max``): a test cannot put itself into a memory-limited cgroup on every machine. The socket is real.
"""

from __future__ import annotations

import os
import socket

from vmcast.receiver.multicast import (
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
