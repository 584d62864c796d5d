"""A parity worker process: makes RaptorQ repair symbols for the server (`vmcast.server.parity`).

Run by `ParityWorkers` as ``python -m vmcast.server.parity_worker``; it imports only `vmcast.protocol` (~0.1 s),
not the server. It reads jobs from stdin and writes answers to stdout, in order, until stdin closes.

Wire (all integers big-endian), a job::

    job id u64 | block u32 | frame size u32 | first ESI u32 | count u32 | key length u16 | bytes length u32
    | key | block bytes (empty: use the encoder kept for (key, block))

an answer::

    job id u64 | status u8 | CPU seconds f64 | symbol count u32 | symbols (count x frame size bytes)

Status 0: the symbols; 1: no encoder kept for (key, block) and no bytes given (ask again with them);
2: the job failed (its arguments; a bug of the caller), no symbols.

The process keeps the encoders of the last `ENCODERS_KEPT` blocks it was given (most recently used last), and
the caller mirrors that list to know when it may leave the bytes out: jobs are done in order, so both sides
see the same sequence.

Error handling: a job that fails answers status 2 and the process goes on; a truncated job (the server
died) ends it.
"""

from __future__ import annotations

import collections
import struct
import sys
import time

from vmcast.protocol import ParityEncoder

JOB = struct.Struct(">QIIIIHI")
ANSWER = struct.Struct(">QBdI")
SYMBOLS, MISSING, FAILED = 0, 1, 2

# Encoders kept, most recently used last: the receivers of a block ask at different moments (each polls every
# 0.1-0.15 s), so its parity is asked for again and again while the carousel is near it. Made again, an
# encoder costs 2.6-6 ms; kept, a further job for the block ~0.5 ms. ~2.6 MiB each: 64 MiB.
ENCODERS_KEPT = 24


def _read_exactly(stream, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def serve(source, sink) -> None:
    """Do the jobs read from `source` (a binary stream) and write their answers to `sink`, until EOF."""
    encoders: collections.OrderedDict[tuple[bytes, int], ParityEncoder] = collections.OrderedDict()
    while True:
        header = _read_exactly(source, JOB.size)
        if header is None:
            return
        job_id, block, frame_size, first, count, key_length, bytes_length = JOB.unpack(header)
        key = _read_exactly(source, key_length)
        block_bytes = _read_exactly(source, bytes_length) if bytes_length else b""
        if key is None or block_bytes is None:
            return
        started = time.process_time()
        encoder = encoders.pop((key, block), None)
        status, symbols = SYMBOLS, []
        try:
            if block_bytes:
                encoder = ParityEncoder(block_bytes, frame_size=frame_size)
            if encoder is None:
                status = MISSING
            else:
                encoders[key, block] = encoder
                symbols = encoder.symbols(first, count)
        except ValueError:
            status, symbols = FAILED, []
        while len(encoders) > ENCODERS_KEPT:
            encoders.popitem(last=False)
        sink.write(ANSWER.pack(job_id, status, time.process_time() - started, len(symbols)))
        for symbol in symbols:
            sink.write(symbol)
        sink.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
