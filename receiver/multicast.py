"""The receiving socket: bound to the group, joined on one interface, its buffer sized to the memory it may use.

UDP GRO (``udp(7)``, Linux 5.0+): with ``UDP_GRO`` set, the kernel may hand one ``recvmsg`` several datagrams
of one flow at once, back to back in one buffer, with a ``(SOL_UDP, UDP_GRO, int gso_size)`` control message:
every datagram but the last is ``gso_size`` bytes. A sender's UDP GSO batch (`vmcast.server.sender`) arrives
so whole on loopback and veth, and a NIC doing GRO coalesces a flow's datagrams the same way; one system call
then carries up to 45 frames instead of one. The receiver must split such buffers (`vmcast.receiver.pump`);
a buffer without the control message is one datagram, as without GRO. `open_group_socket` asks for it by
default and goes on without it, silently, on a kernel that refuses.

Error handling: `open_group_socket` raises `OSError` when the group cannot be bound or joined (the caller
reports it); a receive buffer smaller than asked for is not an error, it is reported in `GroupSocket.rcvbuf`
(`buffer_capped` tells; the receiver warns, with the fix),
nor is a kernel without UDP GRO (`GroupSocket.gro`).

Resource handling: the caller owns the returned socket and closes it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

# Linux socket options Python's socket module does not name.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # like SO_RCVBUF, but root may pass net.core.rmem_max
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
# include/uapi/linux/udp.h: the socket option that turns GRO on (an int), and the control message that
# carries the segment size of a coalesced buffer (an int), both at level SOL_UDP (= IPPROTO_UDP, 17).
SOL_UDP = socket.IPPROTO_UDP
UDP_GRO = 104

# Without a size asked for, the receive buffer is this share of the memory the receiver may use (the
# machine's, or less where its cgroup limits it), within these bounds. The buffer absorbs a sender that is
# ahead of the receiver, and the kernel takes the memory only for datagrams queued. On loopback an unpaced
# sender got 300-500 MiB of a 1 GiB image ahead of one receiver core: with 64 MiB the socket dropped 116k-278k
# datagrams, repaired later (2.9-3.3 Gbit/s); with 512 MiB none (4.9-5.0 Gbit/s). On a lossy test bed whose
# 2 cores 4 receivers share, a receiver starved of CPU for a moment overflowed 64 MiB, and asked for frames
# the others then received again.
RECEIVE_BUFFER_SHARE = 32
RECEIVE_BUFFER_MIN = 64 << 20
RECEIVE_BUFFER_MAX = 1 << 30
# The most the kernel grants: it takes an int, halves INT_MAX before doubling what it keeps, and a larger
# Python int does not even fit the call.
RECEIVE_BUFFER_LARGEST = (2**31 - 1) // 2
CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUP = Path("/proc/self/cgroup")

# How long a blocking receive waits before the loop looks at its stop flag again: short enough that Ctrl-C
# and --timeout feel immediate, long enough to cost nothing while data flows.
RECEIVE_TIMEOUT = 0.2


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSocket:
    """A socket that receives one group's datagrams."""

    sock: socket.socket
    """Blocking, with `RECEIVE_TIMEOUT` as SO_RCVTIMEO (a receive then raises `BlockingIOError`)."""
    group: str
    """The multicast group address."""
    port: int
    """The UDP port."""
    interface: str
    """The local address of the interface the group was joined on."""
    rcvbuf: int
    """The receive buffer as the kernel reports it (Linux doubles the size asked, for its bookkeeping)."""
    asked: int = 0
    """The receive buffer asked for, in bytes."""
    gro: bool = False
    """UDP GRO is on: a receive may return several datagrams in one buffer (see the module's docstring)."""


def open_group_socket(*, group: str, port: int, interface: str, receive_buffer: int | None = None, gro: bool = True) -> GroupSocket:
    """Bind (group, port), join the group on `interface`, size the receive buffer (None: `auto_receive_buffer`),
    and (with `gro`) ask for UDP GRO, going on without it where the kernel refuses."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        asked = min(auto_receive_buffer() if receive_buffer is None else receive_buffer, RECEIVE_BUFFER_LARGEST)
        _grow_receive_buffer(sock, asked)
        gro = gro and enable_gro(sock)  # before the join: every datagram queued is then read the same way
        # Binding to the group address (not INADDR_ANY) keeps out unicast and other groups' datagrams sent
        # to the same port; IP_MULTICAST_ALL=0 keeps out groups other sockets of this host joined.
        sock.bind((group, port))
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        except OSError:
            pass  # not Linux: binding to the group address already filters
        membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        # A blocking socket with SO_RCVTIMEO, not settimeout(): Python implements settimeout with a poll()
        # before every recv, one more system call per datagram.
        seconds = int(RECEIVE_TIMEOUT)
        microseconds = int((RECEIVE_TIMEOUT - seconds) * 1_000_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, microseconds))
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except BaseException:
        sock.close()
        raise
    return GroupSocket(sock=sock, group=group, port=port, interface=interface, rcvbuf=rcvbuf, asked=asked, gro=gro)


def buffer_capped(group_socket: GroupSocket) -> bool:
    """Whether the kernel granted less receive buffer than asked (it reports twice what it grants): without
    CAP_NET_ADMIN, SO_RCVBUF is capped at ``net.core.rmem_max`` silently."""
    return group_socket.rcvbuf < 2 * group_socket.asked


def enable_gro(sock: socket.socket) -> bool:
    """Turn UDP GRO on for `sock`; False (and nothing changed) where the kernel or platform refuses.

    True means its datagrams must from now on be read with ``recvmsg`` and split (`vmcast.receiver.pump`).
    """
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False  # ENOPROTOOPT before Linux 5.0, or not Linux
    return True


def auto_receive_buffer(*, memory: int | None = None) -> int:
    """The receive buffer to ask for when none was: `RECEIVE_BUFFER_SHARE` of `memory` (default: what
    `usable_memory` finds), between `RECEIVE_BUFFER_MIN` and `RECEIVE_BUFFER_MAX`."""
    memory = usable_memory() if memory is None else memory
    return max(RECEIVE_BUFFER_MIN, min(RECEIVE_BUFFER_MAX, memory // RECEIVE_BUFFER_SHARE))


def usable_memory(*, cgroup_root: Path = CGROUP_ROOT, own_cgroup: Path = OWN_CGROUP) -> int:
    """The machine's memory, or the lowest ``memory.max`` of this process's cgroup (v2) and its ancestors,
    if lower: a receiver in a container gets a share of what the container may use, not of the host.

    Error handling: a cgroup tree that cannot be read (v1, not Linux, not mounted) limits nothing.
    """
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return memory
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    if unified is None:
        return memory
    path = cgroup_root / unified.strip("/")
    while True:
        try:
            limit = (path / "memory.max").read_text().strip()
        except OSError:
            limit = "max"  # the root has no memory.max; a cgroup without the controller limits nothing
        if limit.isdigit():
            memory = min(memory, int(limit))
        if path == cgroup_root or cgroup_root not in path.parents:
            return memory
        path = path.parent


def _grow_receive_buffer(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)  # root (CAP_NET_ADMIN) only
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)  # silently capped at net.core.rmem_max


def route_source_address(host: str, port: int = 9) -> str | None:
    """The local IPv4 address the kernel would send from to reach `host` (UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for *_, address in infos:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(address)
                return probe.getsockname()[0]
            except OSError:
                continue
    return None


def is_multicast(address: str) -> bool:
    try:
        return ipaddress.IPv4Address(address).is_multicast
    except ValueError:
        return False


def kernel_drops(sock: socket.socket) -> int | None:
    """Packets the kernel threw away because this socket's buffer was full (``/proc/net/udp``), or None.

    With UDP GRO on, a packet is whatever the kernel would have queued whole: a coalesced GSO batch counts once
    for all its datagrams.

    Read from procfs rather than with SO_RXQ_OVFL, which would need one more control message to parse on
    every receive; this costs nothing until asked.
    """
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
        with open("/proc/net/udp") as table:
            next(table)
            for line in table:
                fields = line.split()
                # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
                if len(fields) >= 13 and fields[9] == inode:
                    return int(fields[12])
    except (OSError, ValueError, StopIteration):
        return None
    return None
