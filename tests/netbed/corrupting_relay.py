"""A multicast relay that corrupts a share of the data datagrams it passes on: a faulty switch, for the tests.

It joins group A (where the server streams, on the sender host) and sends every datagram it hears on to
group B (where the receivers listen), unchanged, except that a data frame (docs/PROTOCOL.md section 2:
offset below 0xFFFFFFFFFFFFFFFF) is, with probability ``--corrupt``, sent with one random byte of its
*payload* changed. The 16-byte header is never touched, so a corrupted frame still carries the stream's
cookie and a valid offset: the receiver takes it, writes it, and must catch it by the block's XXH3-64 (or,
failing that, by the image SHA-1). Metadata frames are never changed either: a changed checksum in metadata
would be a contradiction that fails the stream, which is another test.

Parity frames (docs/PROTOCOL.md section 8: offset with bit 63 set, below the metadata and repair-request
offsets) are corrupted the same way, with probability ``--corrupt-parity`` (default: ``--corrupt``): a
receiver that decodes a block from a corrupted symbol gets a wrong block, which its XXH3-64 must catch.

Datagrams from each source (address, port) of group A leave from a socket of their own, so a sender's
repair frames (docs/PROTOCOL.md section 7: another source port than the carousel's) still come from a port
other than the carousel's after the relay.

Run inside the sender's namespace::

    python corrupting_relay.py --from-group A --from-interface 127.0.0.1 --port P \
        --to-group B --to-interface 10.213.0.1 --corrupt 0.001 --seed 7

It prints ``ready`` once the group is joined; on SIGINT or SIGTERM it prints one JSON line
``{"relayed": n, "data": d, "corrupted": c, "parity": p, "parity_corrupted": pc, "sources": s}`` and exits 0
(``data`` and ``corrupted`` count data frames only).

Error handling: a send that fails is counted (``send_errors``) and the datagram is lost, like on a real
network; anything else is a bug and ends the relay with a traceback.
Resource handling: every socket is closed on exit.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import struct
import sys

HEADER_SIZE = 16
# Offsets at or above this are not image data: 0xFF..FF is a metadata frame, 0xFF..FE a repair request.
FIRST_NON_DATA_OFFSET = 0xFFFF_FFFF_FFFF_FFFE
# Below that, an offset with bit 63 set is a parity frame's (block and symbol id); image offsets stay below 2**53.
PARITY_FLAG = 1 << 63
# Large enough to ride out a scheduling pause of the relay at the test bed's rates (100 Mbit/s: ~0.3 s).
RECEIVE_BUFFER = 4 << 20
# Any IPv4 UDP datagram fits.
DATAGRAM_BUFFER = 1 << 16
SO_RCVBUFFORCE = 33


class _Stop(Exception):
    """Raised by the signal handler to leave the blocking receive."""


def _stop(_signum: int, _frame: object) -> None:
    raise _Stop


def _listening_socket(group: str, port: int, interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind((group, port))
    membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    return sock


def _sending_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    sock.bind((interface, 0))
    return sock


def relay(
    *,
    from_group: str,
    from_interface: str,
    port: int,
    to_group: str,
    to_port: int,
    to_interface: str,
    corrupt: float,
    seed: int,
    corrupt_parity: float | None = None,
) -> dict[str, int]:
    rng = random.Random(seed)
    listener = _listening_socket(from_group, port, from_interface)
    senders: dict[tuple[str, int], socket.socket] = {}
    counts = {"relayed": 0, "data": 0, "corrupted": 0, "parity": 0, "parity_corrupted": 0, "send_errors": 0}
    counts["sources"] = 0
    parity_share = corrupt if corrupt_parity is None else corrupt_parity
    buffer = bytearray(DATAGRAM_BUFFER)
    view = memoryview(buffer)
    destination = (to_group, to_port)
    print("ready", flush=True)
    try:
        while True:
            size, source = listener.recvfrom_into(buffer)
            offset = int.from_bytes(buffer[8:16], "big") if size >= HEADER_SIZE else FIRST_NON_DATA_OFFSET
            if offset < FIRST_NON_DATA_OFFSET:
                parity = bool(offset & PARITY_FLAG)
                counts["parity" if parity else "data"] += 1
                if size > HEADER_SIZE and rng.random() < (parity_share if parity else corrupt):
                    # XOR with a non-zero value: the byte surely changes.
                    buffer[rng.randrange(HEADER_SIZE, size)] ^= rng.randrange(1, 256)
                    counts["parity_corrupted" if parity else "corrupted"] += 1
            out = senders.get(source)
            if out is None:
                out = senders[source] = _sending_socket(to_interface)
                counts["sources"] = len(senders)
            try:
                out.sendto(view[:size], destination)
            except OSError:
                counts["send_errors"] += 1
                continue
            counts["relayed"] += 1
    except _Stop:
        pass
    finally:
        listener.close()
        for out in senders.values():
            out.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from-group", required=True)
    parser.add_argument("--from-interface", required=True, help="address to join group A on")
    parser.add_argument("--port", type=int, required=True, help="UDP port of group A")
    parser.add_argument("--to-group", required=True)
    parser.add_argument("--to-port", type=int, help="UDP port of group B (default: --port)")
    parser.add_argument("--to-interface", required=True, help="address group B leaves by")
    parser.add_argument("--corrupt", type=float, default=0.001, help="share of data datagrams to corrupt")
    parser.add_argument("--corrupt-parity", type=float, help="share of parity datagrams to corrupt (default --corrupt)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    counts = relay(
        from_group=args.from_group, from_interface=args.from_interface, port=args.port, to_group=args.to_group,
        to_port=args.to_port or args.port, to_interface=args.to_interface, corrupt=args.corrupt, seed=args.seed,
        corrupt_parity=args.corrupt_parity,
    )  # fmt: skip
    print(json.dumps(counts, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
