"""Parity payloads for a sender thread: RaptorQ repair symbols of the image's blocks, made beside it.

docs/PROTOCOL.md section 8: when the carousel answers a parity request with `SendParity(block, esi)`, the
sender sends repair symbol `esi` of that block. Making a block's `ParityEncoder` is the expensive step (2.6 to
6 ms for a 1 MiB block: RaptorQ's intermediate symbols); the symbols after that cost a few µs each, though
each call into the library costs ~0.5 ms (it makes the block's source packets again).

Why not in the sender thread: the carousel hands parity out one block after another (`RepairQueue.pop_parity`),
so at 5% loss a new block's encoder is needed every few dozen datagrams; made inline, each stalled the thread
for longer than the token bucket's burst (`pacing.BURST_SECONDS`) absorbs, and a stream paced at 300 Mbit/s
sent 262 (measured, loaded 2-core machine). Nor in a thread: raptorq holds the GIL for the whole call (a probe
thread saw 10-13 ms gaps), which stalls the sender the same. So worker *processes* (`ParityWorkers`, one set
per server, shared by its streams: ``python -m vmcast.server.parity_worker``, which imports only
`vmcast.protocol`) make them from a copy of the block, and the sender thread only takes finished symbols:

* `prefetch(block, count)` when a request arrives: the worker starts on the block at once, usually long before
  the carousel's turn for it comes (a job makes every symbol asked for plus `SYMBOLS_AHEAD`, in one call);
* `symbol(block, esi)` when the carousel's turn comes: the symbol, or None when it is not made yet (a job is
  then queued if none covers it); the sender keeps that action and sends it when `poll()` names the block.

What is kept is symbols, not encoders (a few MiB each): per block the run of symbols made and not sent yet,
dropped as they are sent (the queue never hands out an ESI twice), at most `SYMBOL_BUDGET` bytes (oldest
blocks dropped first: one dropped is made again if asked for), and at most `JOBS_IN_FLIGHT` jobs handed to
the workers; the others wait here, those the sender is waiting for first.

`ParitySource` is used by one sender thread; `ParityWorkers` by any.
Error handling: a job the worker refuses (a bug: the arguments are checked) raises `ValueError` in the sender
thread from `poll`, which ends it (the stream shows ``failed``); a symbol of the wrong size likewise (sent, it
would cut a GSO batch into wrong datagrams). A worker that cannot read the image file (`ParitySource`'s
`path`) answers so, and the stream's jobs carry the block's bytes from then on (logged once). A worker
process that ends (killed, out of memory) is logged and started again (`MAX_RESTARTS`); its jobs are asked
for again. Where no process can be started, symbols are
made in the caller's thread (logged once): slower pacing, same symbols.
Resource handling: the worker processes (children of the server, each with a writer and a reader thread)
start when the first stream with FEC starts; the server closes `ParityWorkers` after its senders, which
closes their stdin (they exit) and kills any that do not. A job names its block in the image file, which the
worker reads itself (its own descriptor, ``/proc/<server pid>/fd/<n>``; `parity_worker` says why), or gets a
copy of the block, never the map; a stream that ends tells the workers to close its file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from vmcast.protocol import Layout, ParityEncoder

from . import parity_worker

# Symbols a job makes beyond what was asked. A block is often asked again soon after (a receiver whose
# request came later, or one that lost parity too): 32 more symbols cost ~130 µs and 45 KB with the rest,
# another job at least 0.5 ms and a trip through the worker.
SYMBOLS_AHEAD = 32
# Bytes of symbols made and not sent yet, over all blocks of the stream: 32 MiB is ~24,000 symbols of 1400
# bytes, e.g. 500 blocks asking 48 each: more than the queue holds at the loss rates FEC is for.
SYMBOL_BUDGET = 32 << 20
# Jobs handed to the workers at once, per stream: one running in each worker process and one queued behind
# it. The others wait here, where a job the sender is waiting for (a symbol the carousel gave its turn) goes
# before those made ahead: queued in a worker, it waited behind up to 8 of them on the test bed's busy cores
# (p50 217 ms from the carousel's turn to the symbol, and receivers asked again).
JOBS_IN_FLIGHT = 4
# Worker processes of a server. Two: the work is small (at 1 Gbit/s and 5% loss ~40% of a core: ~110 blocks/s
# at 3.5 ms) but must come quickly, or receivers ask again and there is more of it; on cores shared with
# other work (the test bed's receivers) one process got a quarter of a core, jobs took 31 ms (p50) for 4 ms
# of CPU, and the queue grew to half a second. Two take their share twice.
PARITY_PROCESSES = 2
# Encoders each worker process keeps (see `parity_worker.ENCODERS_KEPT`); mirrored here.
ENCODERS_KEPT = parity_worker.ENCODERS_KEPT
# A worker process whose stdin closed exits at once; one that does not within this is killed.
WORKER_EXIT_WAIT = 2.0
# Worker processes that die (killed, out of memory, a crash in the library) are started again this many times
# per server; after that parity is made in the senders' threads (slower pacing while it is, same symbols).
MAX_RESTARTS = 3
# RFC 6330's encoding symbol ids are 24 bits.
_ESI_LIMIT = 1 << 24


@dataclass(slots=True)
class _Job:
    first: int
    """ESI of the first symbol it makes."""
    count: int
    future: concurrent.futures.Future[tuple[list[bytes], float]]


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileBlock:
    """Where a block is in the image file, for a worker to read it there."""

    path: str
    """A path to the file that any process of this user can open (``/proc/<pid>/fd/<n>``)."""
    offset: int
    length: int


class SourceUnreadable(Exception):
    """A worker could not open or read the image file a job named."""


class WorkerGone(Exception):
    """A job's worker process ended before answering (killed, out of memory, a crash in the library)."""


class EncoderNotKept(Exception):
    """A job without the block's bytes reached a worker that no longer kept the block's encoder."""


def _encode_here(block_bytes: bytes, frame_size: int, first: int, count: int) -> tuple[list[bytes], float]:
    """Symbols made in the calling thread (where no worker process can be started)."""
    started = time.thread_time()
    symbols = ParityEncoder(block_bytes, frame_size=frame_size).symbols(first, count)
    return symbols, time.thread_time() - started


def _settle(future: concurrent.futures.Future, *, result: object = None, error: BaseException | None = None) -> None:
    """Give a job's future its outcome, unless its stream stopped and cancelled it meanwhile
    (`ParitySource.close`): setting a cancelled future raises, and would end the worker's reader thread."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


class _Worker:
    """One ``python -m vmcast.server.parity_worker`` process, with a thread that writes its jobs (a write of a
    1 MiB block may wait while the process is busy: never in the caller's thread) and one that reads its
    answers. `kept` mirrors the encoders the process keeps, so a job leaves the block's bytes out when it can
    (`parity_worker` describes the rule both follow)."""

    def __init__(self, name: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmcast.server.parity_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.kept: collections.OrderedDict[tuple[bytes, int], None] = collections.OrderedDict()
        self._pending: dict[int, tuple[concurrent.futures.Future[tuple[list[bytes], float]], int, tuple[bytes, int]]] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._next_id = 0
        self.alive = True
        self._writer = threading.Thread(target=self._write, name=f"{name}-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    def submit(
        self, key: bytes, block: int, frame_size: int, first: int, count: int, *, block_bytes: Callable[[], bytes], at: FileBlock | None
    ) -> concurrent.futures.Future[tuple[list[bytes], float]]:
        future: concurrent.futures.Future[tuple[list[bytes], float]] = concurrent.futures.Future()
        with self._lock:
            if not self.alive:
                future.set_exception(WorkerGone("the parity worker process ended"))
                return future
            job_id, self._next_id = self._next_id, self._next_id + 1
            kept = self.kept
            if (key, block) in kept:  # the process keeps this block's encoder: no need for the block
                kept.move_to_end((key, block))
                kind, given, length, offset = parity_worker.KEPT, b"", 0, 0
            else:
                kept[key, block] = None
                while len(kept) > ENCODERS_KEPT:
                    kept.popitem(last=False)
                if at is not None:
                    kind, given, length, offset = parity_worker.FILE, at.path.encode(), at.length, at.offset
                else:
                    given = block_bytes()
                    kind, length, offset = parity_worker.INLINE, len(given), 0
            self._pending[job_id] = (future, frame_size, (key, block))
        path_length = len(given) if kind == parity_worker.FILE else 0
        header = parity_worker.JOB.pack(job_id, block, frame_size, first, count, len(key), kind, length, offset, path_length)
        self._outbox.put(header + key + given)
        return future

    def forget(self, key: bytes) -> None:
        """The stream of `key` ended: the process closes its file and drops its encoders (no answer)."""
        with self._lock:
            if not self.alive:
                return
            for entry in [entry for entry in self.kept if entry[0] == key]:
                del self.kept[entry]
        self._outbox.put(parity_worker.JOB.pack(0, 0, 0, 0, 0, len(key), parity_worker.FORGET, 0, 0, 0) + key)

    def close(self) -> None:
        """End the process: its stdin closes (it exits), or it is killed after `WORKER_EXIT_WAIT`."""
        self._outbox.put(None)
        try:
            self.process.wait(WORKER_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(WORKER_EXIT_WAIT)

    def _write(self) -> None:
        stdin = self.process.stdin
        try:
            while (job := self._outbox.get()) is not None:
                stdin.write(job)
                stdin.flush()
        except OSError:  # the process is gone: the reader sees it too
            pass
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def _read(self) -> None:
        stdout = self.process.stdout
        answer = parity_worker.ANSWER
        try:
            while (header := stdout.read(answer.size)) and len(header) == answer.size:
                job_id, status, cpu, count = answer.unpack(header)
                with self._lock:
                    future, frame_size, entry = self._pending.pop(job_id)
                # One read, not one a symbol: those reads were 75 of the server's 1,320 busy samples at 1% loss.
                data = stdout.read(frame_size * count)
                if len(data) != frame_size * count:
                    break  # cut short: the process died mid-answer
                symbols = [data[start : start + frame_size] for start in range(0, len(data), frame_size)]
                if status == parity_worker.SYMBOLS:
                    _settle(future, result=(symbols, cpu))
                    continue
                with self._lock:
                    self.kept.pop(entry, None)
                if status == parity_worker.MISSING:
                    _settle(future, error=EncoderNotKept(f"block {entry[1]}"))
                elif status == parity_worker.UNREADABLE:
                    _settle(future, error=SourceUnreadable(f"block {entry[1]}"))
                else:
                    _settle(future, error=ValueError(f"the parity worker refused the job for block {entry[1]}"))
        finally:
            with self._lock:
                self.alive = False
                pending, self._pending = self._pending, {}
                self.kept.clear()
            for future, _, _ in pending.values():
                _settle(future, error=WorkerGone("the parity worker process ended"))


class ParityWorkers:
    """The processes that make parity for every stream of a server (started when a stream that may need
    them starts, `warm_up`, or with the first job). Thread-safe."""

    def __init__(self, *, processes: int = PARITY_PROCESSES) -> None:
        self._processes = processes
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * processes
        self._inline = False  # no process could be started: make symbols in the caller's thread
        self._closed = False
        self.restarts = 0

    def submit(
        self, key: bytes, block: int, frame_size: int, first: int, count: int, *, block_bytes: Callable[[], bytes], at: FileBlock | None = None
    ) -> concurrent.futures.Future[tuple[list[bytes], float]]:
        """Make symbols ``first .. first + count - 1`` of `block` of the stream `key` (unique among the
        server's streams). The worker reads the block from the file `at` names, or gets `block_bytes()` (a
        copy: never a view of a map) where `at` is None. A block always goes to the same process, which keeps
        its encoder for the next job."""
        with self._lock:
            worker = self._worker(hash((key, block)) % self._processes)
        if worker is not None:
            return worker.submit(key, block, frame_size, first, count, block_bytes=block_bytes, at=at)
        done: concurrent.futures.Future[tuple[list[bytes], float]] = concurrent.futures.Future()
        try:
            done.set_result(_encode_here(block_bytes(), frame_size, first, count))
        except Exception as error:  # noqa: BLE001 - handed over like a worker's
            done.set_exception(error)
        return done

    def forget(self, key: bytes) -> None:
        """The stream of `key` ended: the processes close its file and drop its encoders."""
        with self._lock:
            workers = [worker for worker in self._workers if worker is not None]
        for worker in workers:
            worker.forget(key)

    @property
    def pids(self) -> list[int]:
        """The worker processes running now."""
        with self._lock:
            return [worker.process.pid for worker in self._workers if worker is not None and worker.alive]

    def warm_up(self) -> None:
        """Start the processes now (a stream that may need parity starts): started at its first request
        instead, their start-up came when the stream was busiest, and receivers asked again meanwhile."""
        with self._lock:
            for index in range(self._processes):
                self._worker(index)

    def close(self) -> None:
        """End the processes; their unanswered jobs fail with `WorkerGone`."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, [None] * self._processes
        for worker in workers:
            if worker is not None:
                worker.close()

    def _worker(self, index: int) -> _Worker | None:
        """(Under the lock.) Worker `index`, started (again) if need be; None: make symbols here."""
        worker = self._workers[index]
        if worker is not None and worker.alive:
            return worker
        if self._closed or self._inline:
            return None
        if worker is not None:  # it died
            self.restarts += 1
            worker.close()
            if self.restarts > MAX_RESTARTS:
                log.error("parity worker processes ended %d times: parity is made in the senders' threads from now on", self.restarts)
                self._inline = True
                return None
            log.warning("a parity worker process ended (exit status %s); starting another", worker.process.returncode)
        try:
            worker = self._workers[index] = _Worker(f"vmcast-parity-{index}")
        except OSError as error:
            log.warning("no parity worker process (%s): parity is made in the senders' threads", error)
            self._inline = True
            return None
        return worker


class ParitySource:
    """Repair symbols of `view`'s blocks (the image as mapped), `layout.frame_size` bytes each."""

    def __init__(self, *, view: memoryview, layout: Layout, workers: ParityWorkers, key: bytes, path: str | None = None) -> None:
        """`key`: the stream's, unique among the server's running streams (its workers keep encoders by it).
        `path`: where the workers may open the file `view` maps (None: jobs carry copies of the blocks)."""
        self._key = key
        self._path = path
        self._view = view
        self._layout = layout
        self._workers = workers
        self._symbols: collections.OrderedDict[int, tuple[int, collections.deque[bytes]]] = collections.OrderedDict()
        """block -> (ESI of the first symbol kept, the symbols from it on), least recently made first."""
        self._kept_bytes = 0
        self._jobs: dict[int, _Job] = {}
        self._urgent: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        """block -> (first ESI, count) of jobs the sender waits for, to hand over first (`JOBS_IN_FLIGHT`)."""
        self._waiting: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        """block -> (first ESI, count) of jobs made ahead, handed over when no urgent one waits."""
        self._next_esi: array | None = None
        """Per block, the ESI after the last one sent, 0 before the first (the queue hands them out in order
        from K); made with the first symbol: 4 bytes a block."""
        self.jobs = 0
        """Jobs done: one when a block is first asked for, another when its symbols run out (the worker then
        usually still has the block's encoder: ~0.5 ms rather than 2.6-6)."""
        self.symbols_made = 0
        self.cpu_seconds = 0.0
        """CPU time the worker spent making encoders and symbols."""

    # -- the sender thread's calls ---------------------------------------------------------------------------

    def prefetch(self, block: int, count: int) -> None:
        """A request asked for `count` more symbols of `block`: make them now, before the carousel's turn."""
        if not 0 <= block < self._layout.block_count or count <= 0:
            return
        first = (self._next_esi[block] if self._next_esi is not None else 0) or self._layout.frames_in_block(block)
        stop = first + count
        kept = self._symbols.get(block)
        if kept is not None and kept[0] <= first and stop <= kept[0] + len(kept[1]):
            return
        job = self._jobs.get(block)
        if job is not None and job.first <= first and stop <= job.first + job.count:
            return
        if job is None:
            self._want(block, first, count + SYMBOLS_AHEAD, urgent=False)

    def ensure(self, block: int, esi: int, *, still_needed: int = 0) -> bool:
        """Whether symbol `esi` of `block` is made; if not, a job will make it and `still_needed` more of the
        block (`poll()` names the block when its job finished)."""
        job = self._jobs.get(block)
        if job is not None and job.future.done():
            self._harvest(block)
            job = None
        kept = self._symbols.get(block)
        if kept is not None:
            if 0 <= esi - kept[0] < len(kept[1]):
                return True
            if esi >= kept[0] + len(kept[1]):
                self._forget(block)  # all sent or skipped: ESIs only grow
        if job is None:
            self._want(block, esi, 1 + still_needed + SYMBOLS_AHEAD, urgent=True)
        return False

    def symbol(self, block: int, esi: int, *, still_needed: int = 0) -> bytes | None:
        """Symbol `esi` of `block` (exactly `frame_size` bytes), taken out; or None if it is not made yet
        (as `ensure`): ask again after `poll()` names the block."""
        if not self.ensure(block, esi, still_needed=still_needed):
            return None
        first, symbols = self._symbols[block]
        for _ in range(esi - first):  # ESIs only grow: those before this one will not be asked for
            symbols.popleft()
        symbol = symbols.popleft()
        self._kept_bytes -= (esi - first + 1) * len(symbol)
        if symbols:
            self._symbols[block] = (esi + 1, symbols)
        else:
            del self._symbols[block]
        if self._next_esi is None:
            self._next_esi = array("I", bytes(4 * self._layout.block_count))
        self._next_esi[block] = esi + 1
        return symbol

    def poll(self) -> list[int]:
        """Take the symbols of finished jobs and queue waiting ones; the blocks whose jobs finished."""
        finished = [block for block, job in self._jobs.items() if job.future.done()]
        for block in finished:
            self._harvest(block)
        self._hand_over()
        return finished

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for a job to finish (when the sender has nothing else to do)."""
        futures = [job.future for job in self._jobs.values()]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    @property
    def jobs_in_flight(self) -> int:
        """Jobs handed to the workers and not harvested yet (at most `JOBS_IN_FLIGHT`)."""
        return len(self._jobs)

    @property
    def kept_bytes(self) -> int:
        """Bytes of symbols made and not sent yet."""
        return self._kept_bytes

    def warm_up(self) -> None:
        """Start the workers now (see `ParityWorkers.warm_up`)."""
        self._workers.warm_up()

    def close(self) -> None:
        """Drop this stream's jobs and symbols (the workers are the server's)."""
        for job in self._jobs.values():
            job.future.cancel()
        self._jobs.clear()
        self._urgent.clear()
        self._waiting.clear()
        self._symbols.clear()
        self._kept_bytes = 0
        self._workers.forget(self._key)

    # -- inside ------------------------------------------------------------------------------------------------

    def _harvest(self, block: int) -> None:
        job = self._jobs.pop(block)
        try:
            symbols, cpu = job.future.result()  # another exception (a bug) ends the sender thread here
        except (WorkerGone, EncoderNotKept, concurrent.futures.CancelledError):
            return  # the symbols are asked for again when the sender next needs them (a new process if need be)
        except SourceUnreadable:
            if self._path is not None:
                log.warning("a parity worker cannot read %s: parity jobs carry the blocks' bytes from now on", self._path)
                self._path = None
            return
        self.cpu_seconds += cpu
        self.jobs += 1
        self.symbols_made += len(symbols)
        frame_size = self._layout.frame_size
        if any(len(symbol) != frame_size for symbol in symbols):
            raise ValueError(f"a parity symbol of block {block} is not {frame_size} bytes")
        self._forget(block)
        self._symbols[block] = (job.first, collections.deque(symbols))
        self._kept_bytes += len(symbols) * frame_size
        while self._kept_bytes > SYMBOL_BUDGET and len(self._symbols) > 1:
            self._forget(next(iter(self._symbols)))

    def _want(self, block: int, first: int, count: int, *, urgent: bool) -> None:
        """A job for `block` (none is in flight), behind the others of its kind."""
        count = max(1, min(count, _ESI_LIMIT - first))
        queue = self._urgent if urgent or block in self._urgent else self._waiting
        waiting = queue.get(block) or self._waiting.pop(block, None)
        if waiting is not None and waiting[0] == first:
            count = max(count, waiting[1])
        queue[block] = (first, count)  # a block already there keeps its place
        self._hand_over()

    def _hand_over(self) -> None:
        while len(self._jobs) < JOBS_IN_FLIGHT and (self._urgent or self._waiting):
            block, (first, count) = (self._urgent or self._waiting).popitem(last=False)
            self._submit(block, first, count)

    def _submit(self, block: int, first: int, count: int) -> None:
        start, end = self._layout.block_span(block)
        at = FileBlock(self._path, start, end - start) if self._path is not None else None
        future = self._workers.submit(
            self._key, block, self._layout.frame_size, first, count, block_bytes=lambda: bytes(self._view[start:end]), at=at
        )  # fmt: skip
        self._jobs[block] = _Job(first=first, count=count, future=future)

    def _forget(self, block: int) -> None:
        kept = self._symbols.pop(block, None)
        if kept is not None:
            self._kept_bytes -= len(kept[1]) * self._layout.frame_size
