"""A stand-in for receivers that ask for parity: it asks a server for RaptorQ parity of every block, so that
parity frames flow on a stream whose receivers do not ask themselves (the corruption test's receivers join the
relay's group without a server). docs/PROTOCOL.md sections 7 and 8.

Run inside the sender's namespace::

    python parity_asker.py --server 10.213.0.1 --repair-port 8470 --cookie 0123456789abcdef --blocks 32 \\
        --count 48 --delay 4 --rounds 2 --every 1.5

After ``--delay`` seconds, and then every ``--every`` seconds, ``--rounds`` times (0: until stopped), it sends
one request (split into datagrams of at most 48 entries) asking ``--count`` more symbols of each block. It
prints ``ready`` once its socket is open; on SIGINT or SIGTERM it prints one JSON line
``{"requests": n, "datagrams": d, "send_errors": e}`` and exits 0.

Error handling: a send that fails is counted and the next round tries again.
Resource handling: the socket is closed on exit.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading

from vmcast.protocol import RepairRequest, encode_repair_requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="the server's address (its API host)")
    parser.add_argument("--repair-port", type=int, required=True)
    parser.add_argument("--cookie", required=True, help="the stream's cookie, 16 hex digits")
    parser.add_argument("--blocks", type=int, required=True, help="the stream's block count")
    parser.add_argument("--count", type=int, default=24, help="symbols asked per block per round")
    parser.add_argument("--every", type=float, default=0.25, help="seconds between rounds")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the first round")
    parser.add_argument("--rounds", type=int, default=0, help="rounds to ask (0: until stopped)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    request = RepairRequest(parity=tuple((block, args.count) for block in range(args.blocks)))
    datagrams = encode_repair_requests(bytes.fromhex(args.cookie), request)
    counts = {"requests": 0, "datagrams": 0, "send_errors": 0}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        print("ready", flush=True)
        wait = args.delay
        while not stop.wait(wait) and (not args.rounds or counts["requests"] < args.rounds):
            wait = args.every
            counts["requests"] += 1
            for datagram in datagrams:
                try:
                    sock.sendto(datagram, (args.server, args.repair_port))
                    counts["datagrams"] += 1
                except OSError:
                    counts["send_errors"] += 1
    print(json.dumps(counts, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
