"""A throw-away multicast LAN built from Linux network namespaces.

One :class:`TestBed` is one sender and N receivers, each in its own network
namespace, each with one veth link (``lan0``) into a Linux bridge that lives
in a further "hub" namespace. Nothing is created in the machine's own network
namespace, so a bed can never disturb the host's real interfaces, and two
beds (in parallel test workers, say) never share a name or a segment.

Per link the bed can impose

* a rate (``tc tbf`` on both directions of the veth pair, so a receiver's
  downlink *and* the sender's uplink are each R),
* real kernel-level UDP loss (an nftables rule in the host's input hook,
  ``numgen random``; loss can be changed at run time with
  :meth:`TestBed.set_loss`),
* an MTU.

Topology::

    [ns …-snd]  lan0 10.213.0.1  ──veth── to-snd ┐
    [ns …-r0]   lan0 10.213.0.10 ──veth── to-r0  ├─ br0  [ns …-hub]
    [ns …-r1]   lan0 10.213.0.11 ──veth── to-r1  ┘

Run ``python -m benchmarks.testbed --selfcheck`` (as root) for a quick
end-to-end check that prints what the links actually deliver.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

__all__ = [
    "LinkSpec",
    "TestBed",
    "Host",
    "TestBedError",
    "testbed_available",
    "reap_stale_namespaces",
    "SUBNET_PREFIX",
    "HOST_INTERFACE",
]

# A made-up private /24. It exists only inside each bed's own namespaces, so
# every bed can reuse it without clashing with the host or with other beds.
SUBNET_PREFIX = "10.213.0"
SUBNET_PREFIX_LENGTH = 24
SENDER_ADDRESS = f"{SUBNET_PREFIX}.1"
FIRST_RECEIVER_HOST_NUMBER = 10
MAX_RECEIVERS = 254 - FIRST_RECEIVER_HOST_NUMBER

# Every host namespace sees exactly one interface of this name; keeping it the
# same everywhere lets peer tools be started with an identical `-I lan0`.
HOST_INTERFACE = "lan0"
BRIDGE_INTERFACE = "br0"
MULTICAST_ROUTE = "224.0.0.0/4"

LOSS_TABLE = "vmcast_loss"
LOSS_CHAIN = "input"
# nftables' numgen works in integers; 10000 buckets give 0.01 % resolution.
LOSS_BUCKETS = 10_000

# Most UDP loss on a busy machine is full socket buffers, not the link. Peer
# tools ask for large SO_RCVBUF/SO_SNDBUF, and the kernel silently caps them at
# these global limits, so the bed raises them (never lowers them).
SOCKET_BUFFER_MAX_BYTES = 64 * 1024 * 1024

# tbf: a bucket of at least 4 ms worth of bytes lets a paced sender through at
# line rate; the latency bound sizes the queue (drop instead of bufferbloat).
TBF_MIN_BURST_SECONDS = 1 / 250
TBF_LATENCY_MS = 50

COMMAND_TIMEOUT_SECONDS = 15.0
PROCESS_STOP_GRACE_SECONDS = 3.0
DEFAULT_RUN_TIMEOUT_SECONDS = 120.0

_NAMESPACE_NAME = re.compile(r"^(?P<prefix>[a-z][a-z0-9]*)-(?P<pid>\d+)-(?P<instance>\d+)-(?P<role>[a-z0-9]+)$")
_instance_numbers = itertools.count()


class TestBedError(RuntimeError):
    """A bed could not be built, changed or torn down completely."""

    __test__ = False  # not a pytest test class despite the name


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LinkSpec:
    """What one host's link into the bridge looks like.

    ``rate_mbit`` limits both directions of the link (``None``: unlimited,
    i.e. as fast as veth and the CPUs go). ``loss_percent`` drops that share
    of the UDP datagrams arriving at the host, at random. ``mtu`` is set on
    both veth ends.
    """

    rate_mbit: float | None = None
    loss_percent: float = 0.0
    mtu: int = 1500

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit must be positive or None, not {self.rate_mbit!r}")
        _check_loss_percent(self.loss_percent)
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be within 576..65535, not {self.mtu!r}")


def _check_loss_percent(percent: float) -> None:
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"loss percent must be within 0..100, not {percent!r}")


class Host:
    """One machine of the bed: a network namespace with one link ``lan0``.

    Attributes: ``name`` (``"sender"``, ``"receiver0"``, …), ``netns`` (the
    namespace name for ``ip netns exec``), ``address`` (its IPv4 address on
    the bed's /24) and ``interface`` (always :data:`HOST_INTERFACE`).

    Resource handling:
        Every process started with :meth:`popen` is remembered by the bed and
        is terminated (by PID) when the bed is torn down, if it is still
        running then. The caller may and should wait for it earlier.
    """

    __slots__ = ("name", "netns", "address", "interface", "_bed")

    def __init__(self, *, name: str, netns: str, address: str, interface: str, bed: TestBed) -> None:
        self.name = name
        self.netns = netns
        self.address = address
        self.interface = interface
        self._bed = bed

    def __repr__(self) -> str:
        return f"Host(name={self.name!r}, netns={self.netns!r}, address={self.address!r})"

    def command(self, argv: Sequence[str]) -> list[str]:
        """Return the argument list that runs ``argv`` inside this namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside this host's namespace; keyword arguments go to Popen.

        ``ip netns exec`` execs the program, so the returned Popen's PID is
        the program itself: signals and ``wait4`` reach it directly.

        Resource handling:
            The process is stopped at bed teardown if still running.
        """
        process = subprocess.Popen(self.command(argv), **kw)
        self._bed._track(process)
        return process

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside this namespace to completion (``subprocess.run``).

        Error handling:
            A ``timeout`` of :data:`DEFAULT_RUN_TIMEOUT_SECONDS` applies unless
            one is given, so a hung tool cannot hang the caller; on timeout
            ``subprocess.TimeoutExpired`` is raised after the child was killed.
        """
        kw.setdefault("timeout", DEFAULT_RUN_TIMEOUT_SECONDS)
        return subprocess.run(self.command(argv), **kw)

    def read_proc_file(self, path: str) -> str:
        """Read a ``/proc/net/…`` or ``/sys/class/net/…`` file as seen from inside the namespace."""
        completed = self.run(["cat", path], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=True)
        return completed.stdout

    def udp_counters(self) -> dict[str, int]:
        """The ``Udp:`` counters of this namespace's ``/proc/net/snmp``."""
        return _parse_snmp_section(self.read_proc_file("/proc/net/snmp"), "Udp")

    def rcvbuf_errors(self) -> int:
        """UDP datagrams this namespace dropped because a socket's receive buffer was full."""
        return self.udp_counters()["RcvbufErrors"]

    def interface_bytes(self) -> tuple[int, int]:
        """``(tx_bytes, rx_bytes)`` of ``lan0`` so far, Ethernet headers included."""
        stats = _interface_stats(self.netns, self.interface)
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def tx_bytes(self) -> int:
        """Bytes this host has put on its link so far (Ethernet headers included)."""
        return self.interface_bytes()[0]

    def tx_counters(self) -> tuple[int, int]:
        """``(bytes, packets)`` this host has put on its link so far (bytes with Ethernet headers)."""
        stats = _interface_stats(self.netns, self.interface)
        return int(stats["tx"]["bytes"]), int(stats["tx"]["packets"])


def _parse_snmp_section(text: str, section: str) -> dict[str, int]:
    # /proc/net/snmp holds pairs of lines per protocol: "Udp: Name Name …" then
    # "Udp: 1 2 …"; the names line comes first.
    rows = [line.split() for line in text.splitlines() if line.startswith(section + ":")]
    if len(rows) < 2:
        raise TestBedError(f"no {section} section in /proc/net/snmp")
    names, values = rows[0][1:], rows[1][1:]
    return {name: int(value) for name, value in zip(names, values, strict=True)}


def _interface_stats(netns: str, interface: str) -> dict[str, Any]:
    completed = _ip(["-n", netns, "-json", "-statistics", "link", "show", "dev", interface], capture=True)
    return json.loads(completed.stdout)[0]["stats64"]


def _run_checked(argv: Sequence[str], *, input_text: str | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """Run a set-up command; raise :class:`TestBedError` with its stderr when it fails."""
    try:
        completed = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise TestBedError(f"timed out after {COMMAND_TIMEOUT_SECONDS}s: {' '.join(argv)}") from exc
    if completed.returncode != 0:
        raise TestBedError(f"failed ({completed.returncode}): {' '.join(argv)}: {completed.stderr.strip()}")
    return completed


def _ip(args: Sequence[str], *, capture: bool = False) -> subprocess.CompletedProcess:
    return _run_checked(["ip", *args], capture=capture)


def _run_quietly(argv: Sequence[str]) -> subprocess.CompletedProcess | None:
    """Run a teardown command whose failure is expected when the thing is already gone."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _existing_namespaces() -> set[str]:
    completed = _run_quietly(["ip", "netns", "list"])
    if completed is None or completed.returncode != 0:
        return set()
    # Lines look like "name" or "name (id: 3)".
    return {line.split()[0] for line in completed.stdout.splitlines() if line.strip()}


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_in_namespace(netns: str) -> list[int]:
    completed = _run_quietly(["ip", "netns", "pids", netns])
    if completed is None or completed.returncode != 0:
        return []
    return [int(token) for token in completed.stdout.split() if token.isdigit()]


def _kill_namespace_processes(netns: str) -> None:
    """SIGKILL, by PID, every process still living in a namespace this bed created.

    Such processes are ours (started inside our private namespace); a single
    survivor would keep the namespace alive after ``ip netns del``.
    """
    for pid in _pids_in_namespace(netns):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_namespace(netns: str) -> None:
    _kill_namespace_processes(netns)
    _run_quietly(["ip", "netns", "delete", netns])


def reap_stale_namespaces(prefix: str = "vmc") -> list[str]:
    """Delete namespaces left by a *dead* process that used this prefix.

    A bed is named ``{prefix}-{pid}-{instance}-{role}``; if the PID no longer
    exists (the owner was SIGKILLed, so neither ``__exit__`` nor ``atexit``
    ran), its namespaces are deleted. Namespaces of live PIDs are never
    touched, so parallel runs are safe; a reused PID merely delays reaping.

    Returns the names deleted.
    """
    reaped = []
    for netns in sorted(_existing_namespaces()):
        match = _NAMESPACE_NAME.match(netns)
        if match is None or match["prefix"] != prefix:
            continue
        if _pid_is_alive(int(match["pid"])):
            continue
        _delete_namespace(netns)
        reaped.append(netns)
    return reaped


def _raise_socket_buffer_limits() -> None:
    # net.core.{r,w}mem_max are global on this kernel (not per namespace), so
    # they are raised in the host and deliberately left raised: restoring them
    # would pull the rug from under a concurrently running bed.
    for name in ("rmem_max", "wmem_max"):
        path = f"/proc/sys/net/core/{name}"
        try:
            with open(path) as current_file:
                current = int(current_file.read().strip())
            if current < SOCKET_BUFFER_MAX_BYTES:
                with open(path, "w") as limit_file:
                    limit_file.write(str(SOCKET_BUFFER_MAX_BYTES))
        except OSError as exc:
            raise TestBedError(f"cannot raise net.core.{name}: {exc}") from exc


@functools.cache
def testbed_available() -> tuple[bool, str]:
    """Whether this machine can build a bed: ``(True, "")`` or ``(False, reason)``.

    Checks root, the ``ip``/``tc``/``nft`` tools, and actually creating and
    deleting a namespace (a container may lack CAP_SYS_ADMIN even as root).
    The answer is cached for the life of the process.
    """
    if os.geteuid() != 0:
        return False, "the network-namespace test bed needs root"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` is not installed"
    probe = f"vmcprobe-{os.getpid()}-{next(_instance_numbers)}-probe"
    try:
        created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`ip netns add` failed: {exc}"
    if created.returncode != 0:
        return False, f"`ip netns add` failed: {created.stderr.strip()}"
    _run_quietly(["ip", "netns", "delete", probe])
    return True, ""


# --------------------------------------------------------------------------- cleanup on exit

# Strong references on purpose: a bed someone forgot to close must still be
# reachable by the atexit hook.
_live_beds: set[TestBed] = set()
_live_beds_lock = threading.Lock()
_exit_hooks_installed = False


def _tear_down_live_beds() -> None:
    with _live_beds_lock:
        beds = list(_live_beds)
    for bed in beds:
        bed.close()


def _raise_system_exit_on_signal(signum: int, _frame: object) -> None:
    # Turning SIGTERM/SIGHUP into SystemExit unwinds `with TestBed(...)` blocks
    # and then runs atexit, so a politely killed run leaves nothing behind.
    raise SystemExit(128 + signum)


def _install_exit_hooks() -> None:
    global _exit_hooks_installed
    with _live_beds_lock:
        if _exit_hooks_installed:
            return
        _exit_hooks_installed = True
    atexit.register(_tear_down_live_beds)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        # Only replace the default action; a handler someone else installed
        # (pytest, trio, a service) stays theirs.
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_system_exit_on_signal)


# --------------------------------------------------------------------------- the bed


class TestBed:
    """A sender and ``receivers`` receivers on one bridged /24, each in its own namespace.

    Use as a context manager; ``sender`` and ``receivers`` are valid inside
    the ``with`` block. ``link`` applies to every host; ``receiver_links``
    (one per receiver) overrides it for the receivers. Multicast works on the
    bridge (snooping is off, every host has a 224.0.0.0/4 route and a
    broadcast address), and the sender reaches every receiver by unicast.

    Error handling:
        If building fails, whatever was built is torn down and
        :class:`TestBedError` (with the failing command and its stderr) is
        raised from ``__enter__``. Teardown tolerates partially built or
        already removed state; if something it made still exists afterwards
        it raises :class:`TestBedError`, unless an exception is already
        propagating out of the ``with`` block (then it only prints a warning
        so the original error is not masked).

    Resource handling:
        Creates only namespaces named ``{prefix}-{pid}-{n}-…`` (plus their
        veths, bridge, qdiscs and nft tables, which live and die with those
        namespaces). Teardown stops processes started with
        :meth:`Host.popen`, SIGKILLs by PID anything else still inside the
        bed's namespaces, deletes the veths and then the namespaces. It runs
        on ``__exit__``, at interpreter exit (``atexit``) and on
        SIGTERM/SIGHUP when those still had their default action. Raises the
        machine-wide ``net.core.rmem_max``/``wmem_max`` to 64 MiB and leaves
        them raised.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        *,
        receivers: int,
        link: LinkSpec = LinkSpec(),
        receiver_links: list[LinkSpec] | None = None,
        prefix: str = "vmc",
    ) -> None:
        if not 1 <= receivers <= MAX_RECEIVERS:
            raise ValueError(f"receivers must be within 1..{MAX_RECEIVERS}, not {receivers!r}")
        if receiver_links is not None and len(receiver_links) != receivers:
            raise ValueError(f"receiver_links has {len(receiver_links)} entries for {receivers} receivers")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", prefix):
            raise ValueError(f"prefix must be 1-16 lowercase letters/digits starting with a letter, not {prefix!r}")
        self.prefix = prefix
        self.sender_link = link
        self.receiver_links = list(receiver_links) if receiver_links is not None else [link] * receivers
        self.subnet = f"{SUBNET_PREFIX}.0/{SUBNET_PREFIX_LENGTH}"
        self._name_stem = f"{prefix}-{os.getpid()}-{next(_instance_numbers)}"
        self.hub_netns = f"{self._name_stem}-hub"
        self.sender = Host(
            name="sender", netns=f"{self._name_stem}-snd", address=SENDER_ADDRESS, interface=HOST_INTERFACE, bed=self
        )
        self.receivers = [
            Host(
                name=f"receiver{index}",
                netns=f"{self._name_stem}-r{index}",
                address=f"{SUBNET_PREFIX}.{FIRST_RECEIVER_HOST_NUMBER + index}",
                interface=HOST_INTERFACE,
                bed=self,
            )
            for index in range(receivers)
        ]
        self._links: dict[str, LinkSpec] = {self.sender.netns: link}
        self._links.update({host.netns: spec for host, spec in zip(self.receivers, self.receiver_links, strict=True)})
        self._created_namespaces: list[str] = []
        self._tracked_processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._built = False
        self._closing = False
        self._closed = False

    # ---- public

    @property
    def hosts(self) -> list[Host]:
        """The sender followed by the receivers."""
        return [self.sender, *self.receivers]

    def link_of(self, host: Host) -> LinkSpec:
        """The link spec ``host`` was built with (loss may since have changed)."""
        return self._links[host.netns]

    def tbf_counters(self, host: Host) -> dict[str, int]:
        """Packets the rate limit of ``host``'s link dropped (its queue full) and held back so far, both ways.

        ``up_*``: the tbf on the host's own egress (what it sends); ``down_*``: the tbf on its hub port (what
        reaches it). ``drops`` are packets lost to a full queue; ``overlimits`` counts times a packet had to
        wait for tokens (queueing, not loss). All zeros for an unlimited link (it has no tbf).

        Error handling: :class:`TestBedError` if ``tc`` fails.
        """
        if host.netns not in self._links:
            raise ValueError(f"{host!r} is not part of this bed")
        counters = {"up_drops": 0, "up_overlimits": 0, "down_drops": 0, "down_overlimits": 0}
        if self._links[host.netns].rate_mbit is None:
            return counters
        for direction, netns, interface in (("up", host.netns, host.interface), ("down", self.hub_netns, self._hub_port(host))):
            completed = _run_checked(["tc", "-n", netns, "-s", "-j", "qdisc", "show", "dev", interface], capture=True)
            for qdisc in json.loads(completed.stdout):
                if qdisc.get("kind") == "tbf":
                    counters[f"{direction}_drops"] += int(qdisc.get("drops", 0))
                    counters[f"{direction}_overlimits"] += int(qdisc.get("overlimits", 0))
        return counters

    def set_loss(self, host: Host, percent: float) -> None:
        """Drop ``percent`` % of the UDP datagrams arriving at ``host`` from now on (0 stops it).

        Loss is an nftables rule in the host's input hook, so it happens in
        the kernel after the link (the rate limit has already been paid) and
        before any socket: exactly what a lossy link looks like to the tool.
        TCP is not affected. The rule is replaced atomically.

        Error handling:
            ``ValueError`` for a percent outside 0..100 or a host of another
            bed; :class:`TestBedError` if nft fails.
        """
        _check_loss_percent(percent)
        if host.netns not in self._links:
            raise ValueError(f"{host!r} is not part of this bed")
        script = [f"flush chain inet {LOSS_TABLE} {LOSS_CHAIN}"]
        if percent > 0:
            threshold = round(percent / 100 * LOSS_BUCKETS)
            script.append(
                f"add rule inet {LOSS_TABLE} {LOSS_CHAIN} meta l4proto udp"
                f" numgen random mod {LOSS_BUCKETS} < {threshold} counter drop"
            )
        _run_checked(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input_text="\n".join(script) + "\n")

    def close(self) -> None:
        """Tear everything down (idempotent; what ``__exit__`` calls).

        Error handling:
            Raises :class:`TestBedError` if a namespace of this bed still
            exists afterwards; the bed then stays registered, so the
            ``atexit`` hook tries once more.
        """
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
        try:
            self._tear_down()
        finally:
            # A teardown that was cut short (SystemExit from a SIGTERM, say) or
            # found leftovers leaves the bed open, so the atexit hook tries
            # again; teardown is idempotent.
            with self._lock:
                self._closing = False
        with self._lock:
            self._closed = True
        with _live_beds_lock:
            _live_beds.discard(self)

    def __enter__(self) -> TestBed:
        if self._built or self._closed:
            raise TestBedError("a TestBed can be entered only once")
        _install_exit_hooks()
        with _live_beds_lock:
            _live_beds.add(self)
        try:
            self._build()
        except BaseException:
            try:
                self.close()
            except TestBedError as teardown_error:
                print(f"warning: {teardown_error}", file=sys.stderr)
            raise
        self._built = True
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except TestBedError as teardown_error:
            if exc_type is None:
                raise
            print(f"warning: {teardown_error}", file=sys.stderr)

    # ---- internals

    def _track(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._tracked_processes = [p for p in self._tracked_processes if p.returncode is None]
            self._tracked_processes.append(process)

    def _add_namespace(self, netns: str) -> None:
        _ip(["netns", "add", netns])
        self._created_namespaces.append(netns)
        # IPv6 would chatter (router solicitations, MLD reports) on the link
        # and pollute the byte counters the benchmarks read; the bed is IPv4.
        _run_checked(
            [
                "ip", "netns", "exec", netns, "sysctl", "-q", "-w",
                "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
            ]
        )  # fmt: skip
        _ip(["-n", netns, "link", "set", "lo", "up"])

    def _build(self) -> None:
        reap_stale_namespaces(self.prefix)
        _raise_socket_buffer_limits()
        self._add_namespace(self.hub_netns)
        _ip(["-n", self.hub_netns, "link", "add", BRIDGE_INTERFACE, "type", "bridge", "mcast_snooping", "0", "stp_state", "0"])
        _ip(["-n", self.hub_netns, "link", "set", BRIDGE_INTERFACE, "up"])
        for host in self.hosts:
            self._build_host(host)

    def _hub_port(self, host: Host) -> str:
        return "to-snd" if host is self.sender else f"to-r{self.receivers.index(host)}"

    def _build_host(self, host: Host) -> None:
        spec = self._links[host.netns]
        hub_port = self._hub_port(host)
        self._add_namespace(host.netns)
        # Create the pair inside the hub and push one end straight into the
        # host namespace: no interface ever appears in the machine's own
        # namespace, so names cannot clash with it or with other beds.
        _ip(["-n", self.hub_netns, "link", "add", hub_port, "mtu", str(spec.mtu), "type", "veth",
             "peer", "name", host.interface, "mtu", str(spec.mtu), "netns", host.netns])  # fmt: skip
        _ip(["-n", self.hub_netns, "link", "set", hub_port, "master", BRIDGE_INTERFACE])
        _ip(["-n", self.hub_netns, "link", "set", hub_port, "up"])
        # `brd +` matters: udpcast finds its peers by broadcast and refuses an
        # interface without a broadcast address.
        _ip(["-n", host.netns, "addr", "add", f"{host.address}/{SUBNET_PREFIX_LENGTH}", "brd", "+", "dev", host.interface])
        # A real NIC cuts a UDP GSO batch into datagrams before the wire; a veth would carry it whole through
        # the bridge, and the loss rules would then drop 45-datagram batches at a time. One segment per packet
        # makes the kernel segment here, as hardware would, so loss stays per datagram (the sender still makes
        # one system call per batch).
        _ip(["-n", host.netns, "link", "set", host.interface, "gso_max_segs", "1"])
        _ip(["-n", host.netns, "link", "set", host.interface, "up"])
        _ip(["-n", host.netns, "route", "add", MULTICAST_ROUTE, "dev", host.interface])
        if spec.rate_mbit is not None:
            # Both directions: the host's egress is its uplink, the hub port's
            # egress is its downlink (e.g. what a receiver can take in).
            self._limit_rate(host.netns, host.interface, spec)
            self._limit_rate(self.hub_netns, hub_port, spec)
        self._install_loss_table(host)
        if spec.loss_percent > 0:
            self.set_loss(host, spec.loss_percent)

    @staticmethod
    def _limit_rate(netns: str, interface: str, spec: LinkSpec) -> None:
        assert spec.rate_mbit is not None
        rate_bytes_per_second = spec.rate_mbit * 1e6 / 8
        # The bucket must hold at least a few full frames (and a 64 KiB GSO
        # super-packet, which tbf would otherwise have to split) or tbf
        # throttles below the configured rate.
        burst_bytes = max(int(rate_bytes_per_second * TBF_MIN_BURST_SECONDS), 4 * (spec.mtu + 14), 65536 + 14)
        rate_kbit = max(1, round(spec.rate_mbit * 1000))
        _run_checked(["tc", "-n", netns, "qdisc", "replace", "dev", interface, "root", "tbf",
                      "rate", f"{rate_kbit}kbit", "burst", str(burst_bytes), "latency", f"{TBF_LATENCY_MS}ms"])  # fmt: skip

    @staticmethod
    def _install_loss_table(host: Host) -> None:
        script = (
            f"table inet {LOSS_TABLE} {{\n"
            f"  chain {LOSS_CHAIN} {{ type filter hook input priority filter; policy accept; }}\n"
            "}\n"
        )
        _run_checked(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input_text=script)

    def _stop_tracked_processes(self) -> None:
        with self._lock:
            processes = [p for p in self._tracked_processes if p.poll() is None]
            self._tracked_processes = []
        for process in processes:
            try:
                process.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + PROCESS_STOP_GRACE_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(timeout=PROCESS_STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    pass  # a D-state process; the namespace kill below retries

    def _tear_down(self) -> None:
        self._stop_tracked_processes()
        # Derive the names rather than trusting _created_namespaces alone: a
        # build that died between `ip netns add` and the list append must
        # still be cleaned.
        candidates = list(dict.fromkeys([*self._created_namespaces, self.hub_netns, *(h.netns for h in self.hosts)]))
        existing = _existing_namespaces()
        present = [netns for netns in candidates if netns in existing]
        for netns in present:
            _kill_namespace_processes(netns)
        if self.hub_netns in existing:
            # Deleting a veth end removes its peer at once; doing it explicitly
            # makes removal synchronous instead of waiting on the kernel's
            # asynchronous namespace cleanup.
            for host in self.hosts:
                _run_quietly(["ip", "-n", self.hub_netns, "link", "delete", self._hub_port(host)])
        for netns in reversed(present):
            _run_quietly(["ip", "netns", "delete", netns])
        leftovers = sorted(set(candidates) & _existing_namespaces())
        if leftovers:
            raise TestBedError(f"namespaces still present after teardown: {', '.join(leftovers)}")


# --------------------------------------------------------------------------- self-check

_MULTICAST_GROUP = "239.213.0.1"
_SELFCHECK_UDP_PORT = 47000
_SELFCHECK_TCP_PORT = 47001
_UDP_PAYLOAD_BYTES = 1472  # 1500 MTU - 20 IP - 8 UDP
_UDP_WIRE_OVERHEAD_BYTES = 14 + 20 + 8  # Ethernet + IPv4 + UDP headers, as tbf counts them

# Small helper programs run with `python -c` inside the namespaces; they are
# program text handed over as one argument, not shell.
_MULTICAST_COUNTER_PROGRAM = r"""
import json, socket, struct, sys, time
group, port, address, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
sock.bind((group, port))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(address))
print("ready", flush=True)
sock.settimeout(20.0)
packets = payload = 0
first = last = None
buffer = bytearray(65536)
while True:
    try:
        size = sock.recv_into(buffer)
    except socket.timeout:
        break
    last = time.monotonic()
    if first is None:
        first = last
        sock.settimeout(idle)
    packets += 1
    payload += size
print(json.dumps({"packets": packets, "payload_bytes": payload,
                  "seconds": (last - first) if packets > 1 else 0.0}), flush=True)
"""

_MULTICAST_BURST_PROGRAM = r"""
import json, socket, sys, time
group, port, address, count, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
# A default-sized send buffer (smaller than the tbf queue) makes the socket
# block on the rate limit instead of overflowing the qdisc, so this sends at
# exactly the link rate without pacing of its own.
payload = bytearray(size)
started = time.monotonic()
for sequence in range(count):
    payload[:8] = sequence.to_bytes(8, "big")
    sock.sendto(payload, (group, port))
print(json.dumps({"sent": count, "seconds": time.monotonic() - started}), flush=True)
"""

_TCP_SINK_PROGRAM = r"""
import json, socket, sys, time
address, port = sys.argv[1], int(sys.argv[2])
listener = socket.create_server((address, port))
listener.settimeout(20.0)
print("ready", flush=True)
connection, _ = listener.accept()
connection.settimeout(20.0)
received = 0
first = None
buffer = bytearray(1 << 20)
while True:
    size = connection.recv_into(buffer)
    if size == 0:
        break
    if first is None:
        first = time.monotonic()
    received += size
print(json.dumps({"bytes": received, "seconds": time.monotonic() - first}), flush=True)
"""

_TCP_SOURCE_PROGRAM = r"""
import socket, sys
address, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chunk = bytes(1 << 20)
with socket.create_connection((address, port), timeout=20.0) as connection:
    sent = 0
    while sent < total:
        connection.sendall(chunk)
        sent += len(chunk)
"""


def _read_line(stream: IO[str], timeout: float) -> str:
    """Read one line from a child's stdout, giving up after ``timeout`` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TestBedError(f"no output from child within {timeout}s")
    return stream.readline()


def _start_python(host: Host, program: str, *args: object) -> subprocess.Popen:
    return host.popen([sys.executable, "-c", program, *map(str, args)], stdout=subprocess.PIPE, text=True)


def _finish_json(process: subprocess.Popen, timeout: float) -> dict[str, Any]:
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=PROCESS_STOP_GRACE_SECONDS)
        raise TestBedError(f"helper process {process.pid} did not finish within {timeout}s") from None
    if process.returncode != 0:
        raise TestBedError(f"helper process {process.pid} exited with {process.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def _selfcheck(rate_mbit: float, loss_percent: float, receiver_count: int, datagrams: int) -> int:
    available, reason = testbed_available()
    if not available:
        print(f"selfcheck skipped: {reason}")
        return 2
    links = [LinkSpec(rate_mbit=rate_mbit)] * receiver_count
    links[-1] = LinkSpec(rate_mbit=rate_mbit, loss_percent=loss_percent)
    started = time.monotonic()
    with TestBed(receivers=receiver_count, link=LinkSpec(rate_mbit=rate_mbit), receiver_links=links) as bed:
        print(f"built {receiver_count}-receiver bed in {time.monotonic() - started:.2f}s: "
              f"namespaces {bed.hub_netns}, {bed.sender.netns}, {', '.join(r.netns for r in bed.receivers)}")

        # 1. Multicast burst: every receiver counts what arrives.
        errors_before = [host.rcvbuf_errors() for host in bed.receivers]
        counters = [
            _start_python(receiver, _MULTICAST_COUNTER_PROGRAM, _MULTICAST_GROUP, _SELFCHECK_UDP_PORT, receiver.address, 1.0)
            for receiver in bed.receivers
        ]
        for counter in counters:
            if _read_line(counter.stdout, 10.0).strip() != "ready":
                raise TestBedError("multicast counter did not start")
        tx_before = bed.sender.tx_bytes()
        burst = _start_python(bed.sender, _MULTICAST_BURST_PROGRAM, _MULTICAST_GROUP, _SELFCHECK_UDP_PORT,
                              bed.sender.address, datagrams, _UDP_PAYLOAD_BYTES)  # fmt: skip
        sent = _finish_json(burst, 60.0)
        tx_after = bed.sender.tx_bytes()
        counts = [_finish_json(counter, 30.0) for counter in counters]
        sender_wire_mbit = (tx_after - tx_before) * 8 / sent["seconds"] / 1e6
        print(f"multicast: sender sent {sent['sent']} x {_UDP_PAYLOAD_BYTES} B in {sent['seconds']:.2f}s, "
              f"{tx_after - tx_before} wire bytes = {sender_wire_mbit:.1f} Mbit/s on the wire (limit {rate_mbit:g})")  # fmt: skip
        all_ok = abs(sender_wire_mbit - rate_mbit) / rate_mbit < 0.05
        for receiver, spec, count, before in zip(bed.receivers, links, counts, errors_before, strict=True):
            share = count["packets"] / datagrams
            wire_mbit = (
                count["packets"] * (_UDP_PAYLOAD_BYTES + _UDP_WIRE_OVERHEAD_BYTES) * 8 / count["seconds"] / 1e6
                if count["seconds"] > 0 else 0.0
            )  # fmt: skip
            goodput_mbit = count["payload_bytes"] * 8 / count["seconds"] / 1e6 if count["seconds"] > 0 else 0.0
            rcvbuf_errors = receiver.rcvbuf_errors() - before
            print(f"  {receiver.name} ({receiver.address}, loss {spec.loss_percent:g}%): "
                  f"received {count['packets']}/{datagrams} ({share:.2%}), "
                  f"arrivals {wire_mbit:.1f} Mbit/s wire / {goodput_mbit:.1f} Mbit/s payload, RcvbufErrors +{rcvbuf_errors}")  # fmt: skip
            expected_share = 1 - spec.loss_percent / 100
            all_ok &= abs(share - expected_share) < 0.01 + spec.loss_percent / 200

        # 2. Plain TCP transfer sender -> receiver0: should also run at the link rate.
        sink = _start_python(bed.receivers[0], _TCP_SINK_PROGRAM, bed.receivers[0].address, _SELFCHECK_TCP_PORT)
        if _read_line(sink.stdout, 10.0).strip() != "ready":
            raise TestBedError("TCP sink did not start")
        total = int(rate_mbit * 1e6 / 8 * 3)  # about three seconds' worth
        source = _start_python(bed.sender, _TCP_SOURCE_PROGRAM, bed.receivers[0].address, _SELFCHECK_TCP_PORT, total)
        _finish_without_output(source, 60.0)
        tcp = _finish_json(sink, 30.0)
        tcp_mbit = tcp["bytes"] * 8 / tcp["seconds"] / 1e6
        # TCP payload per 1514-byte frame is 1448 (timestamps on): ~95.6 % of the wire rate.
        print(f"tcp: {tcp['bytes']} B in {tcp['seconds']:.2f}s = {tcp_mbit:.1f} Mbit/s payload "
              f"(~{tcp_mbit * 1514 / 1448:.1f} Mbit/s wire, limit {rate_mbit:g})")  # fmt: skip
        all_ok &= abs(tcp_mbit * 1514 / 1448 - rate_mbit) / rate_mbit < 0.05

        names = [bed.hub_netns, *(h.netns for h in bed.hosts)]
    leftovers = sorted(set(names) & _existing_namespaces())
    print(f"torn down; leftover namespaces: {leftovers or 'none'}")
    all_ok &= not leftovers
    print("selfcheck", "OK" if all_ok else "FAILED")
    return 0 if all_ok else 1


def _finish_without_output(process: subprocess.Popen, timeout: float) -> None:
    """Wait for a helper that prints nothing; raise if it fails or hangs."""
    try:
        process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=PROCESS_STOP_GRACE_SECONDS)
        raise TestBedError(f"helper process {process.pid} did not finish within {timeout}s") from None
    if process.returncode != 0:
        raise TestBedError(f"helper process {process.pid} exited with {process.returncode}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.testbed", description=__doc__.split("\n")[0])
    parser.add_argument("--selfcheck", action="store_true", help="build a bed, measure it, tear it down")
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--rate-mbit", type=float, default=300.0)
    parser.add_argument("--loss-percent", type=float, default=2.0, help="loss on the last receiver only")
    parser.add_argument("--datagrams", type=int, default=50_000)
    parser.add_argument("--reap", action="store_true", help="delete namespaces left by dead processes, then exit")
    args = parser.parse_args(argv)
    if args.reap:
        print("reaped:", reap_stale_namespaces() or "nothing")
        return 0
    if not args.selfcheck:
        parser.print_help()
        return 0
    return _selfcheck(args.rate_mbit, args.loss_percent, args.receivers, args.datagrams)


if __name__ == "__main__":
    sys.exit(main())
