"""Parity for the sender (`vmcast.server.parity`): symbols made in worker processes, handed to the sender thread."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator

import pytest
from vmcast.protocol import ParityEncoder, manifest_of
from vmcast.server import parity_worker
from vmcast.server.parity import SYMBOLS_AHEAD, ParitySource, ParityWorkers

FRAME = 1400


@pytest.fixture
def workers() -> Iterator[ParityWorkers]:
    made = ParityWorkers()
    yield made
    made.close()


def source_of(data: bytes, workers: ParityWorkers) -> tuple[ParitySource, object]:
    layout = manifest_of(data, frame_size=FRAME).layout
    return ParitySource(view=memoryview(data), layout=layout, workers=workers, key=b"test"), layout


def wait_for_jobs(source: ParitySource, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not source.poll():
        assert time.monotonic() < deadline, "no parity job finished"
        source.wait(0.1)


def test_symbols_asked_for_are_made_in_one_job_and_equal_the_blocks_own_encoder(workers: ParityWorkers) -> None:
    data = os.urandom(2_500_000)
    source, layout = source_of(data, workers)
    k = layout.frames_in_block(1)
    source.prefetch(1, 30)
    wait_for_jobs(source)
    start, end = layout.block_span(1)
    expected = ParityEncoder(data[start:end], frame_size=FRAME).symbols(k, 30 + SYMBOLS_AHEAD)
    assert [source.symbol(1, esi) for esi in range(k, k + 30 + SYMBOLS_AHEAD)] == expected
    assert source.jobs == 1 and source.cpu_seconds > 0
    assert source.kept_bytes == 0, "a symbol is dropped once handed out"


def test_a_symbol_not_made_yet_is_none_and_comes_once_its_job_finished(workers: ParityWorkers) -> None:
    data = os.urandom(1_200_000)  # two blocks, the last of 108 frames ending in a short one
    source, layout = source_of(data, workers)
    k = layout.frames_in_block(1)
    assert source.symbol(1, k, still_needed=3) is None  # no job yet: this queues one for 1 + 3 + SYMBOLS_AHEAD
    assert source.symbol(1, k) is None, "asked again before the job finished: still none, and no second job"
    wait_for_jobs(source)
    symbols = [source.symbol(1, esi) for esi in range(k, k + 4)]
    assert all(symbol is not None and len(symbol) == FRAME for symbol in symbols)
    assert source.jobs == 1


def test_a_worker_process_that_dies_is_started_again_and_the_symbols_still_come(workers: ParityWorkers) -> None:
    data = os.urandom(1_100_000)
    source, layout = source_of(data, workers)
    source.prefetch(0, 5)
    wait_for_jobs(source)  # the workers are up
    for worker in [worker for worker in workers._workers if worker is not None]:  # this test's processes
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
    k = layout.frames_in_block(0)
    deadline = time.monotonic() + 30
    esi = k + 5 + SYMBOLS_AHEAD  # past what the first job made: a new job, on a dead process at first
    while (symbol := source.symbol(0, esi)) is None:
        assert time.monotonic() < deadline, "no symbol after the worker died"
        source.poll()
        source.wait(0.1)
    start, end = layout.block_span(0)
    assert symbol == ParityEncoder(data[start:end], frame_size=FRAME).symbols(esi, 1)[0]
    assert workers.restarts >= 1


def test_a_stream_that_stops_with_jobs_in_flight_leaves_the_workers_serving_the_next(workers: ParityWorkers) -> None:
    data = os.urandom(4_300_000)  # 5 blocks
    first, _ = source_of(data, workers)
    for block in range(5):
        first.prefetch(block, 40)
    first.close()  # its stream stopped: the jobs' futures are cancelled while the workers still make them
    second, layout = source_of(data, workers)
    second.prefetch(2, 5)
    wait_for_jobs(second)
    k = layout.frames_in_block(2)
    assert second.symbol(2, k) is not None
    assert workers.restarts == 0, "an answer to a cancelled job ended a worker's reader"
    assert all(worker.alive for worker in workers._workers if worker is not None)


def test_a_job_names_the_block_in_the_image_file_and_the_worker_reads_it_there(workers: ParityWorkers, tmp_path) -> None:
    # The view and the file differ on purpose: symbols of the file's bytes show the worker read the file.
    in_file, in_view = os.urandom(1_100_000), os.urandom(1_100_000)
    (tmp_path / "image.raw").write_bytes(in_file)
    with open(tmp_path / "image.raw", "rb") as image:
        layout = manifest_of(in_file, frame_size=FRAME).layout
        source = ParitySource(view=memoryview(in_view), layout=layout, workers=workers, key=b"file", path=f"/proc/{os.getpid()}/fd/{image.fileno()}")
        source.prefetch(1, 4)
        wait_for_jobs(source)
    k = layout.frames_in_block(1)
    start, end = layout.block_span(1)
    assert [source.symbol(1, esi) for esi in range(k, k + 4)] == ParityEncoder(in_file[start:end], frame_size=FRAME).symbols(k, 4)


def test_a_file_the_workers_cannot_read_makes_the_stream_send_the_blocks_bytes_instead(workers: ParityWorkers, tmp_path, caplog) -> None:
    data = os.urandom(1_100_000)
    layout = manifest_of(data, frame_size=FRAME).layout
    source = ParitySource(view=memoryview(data), layout=layout, workers=workers, key=b"gone", path=str(tmp_path / "no-such-file"))
    k = layout.frames_in_block(0)
    deadline = time.monotonic() + 30
    while (symbol := source.symbol(0, k)) is None:  # the first job comes back unreadable, the next has the bytes
        assert time.monotonic() < deadline, "no symbol after the file could not be read"
        source.poll()
        source.wait(0.1)
    start, end = layout.block_span(0)
    assert symbol == ParityEncoder(data[start:end], frame_size=FRAME).symbols(k, 1)[0]
    assert "cannot read" in caplog.text and str(tmp_path / "no-such-file") in caplog.text
    assert workers.restarts == 0


def test_a_worker_forgets_a_stream_that_ended_its_encoders_and_its_file(tmp_path) -> None:
    data = os.urandom(200_000)
    (tmp_path / "image.raw").write_bytes(data)

    def job(job_id: int, kind: int, path: bytes = b"") -> bytes:
        length = len(data) if kind == parity_worker.FILE else 0
        return parity_worker.JOB.pack(job_id, 0, FRAME, 143, 1, 3, kind, length, 0, len(path)) + b"key" + path

    jobs = io.BytesIO(
        job(1, parity_worker.FILE, str(tmp_path / "image.raw").encode())
        + job(2, parity_worker.KEPT)  # the encoder the first job made
        + job(0, parity_worker.FORGET)  # answers nothing
        + job(3, parity_worker.KEPT)
    )
    answers = io.BytesIO()
    parity_worker.serve(jobs, answers)
    answers.seek(0)
    statuses = []
    while header := answers.read(parity_worker.ANSWER.size):
        job_id, status, _, count = parity_worker.ANSWER.unpack(header)
        symbols = [answers.read(FRAME) for _ in range(count)]
        statuses.append((job_id, status, symbols))
    expected = ParityEncoder(data, frame_size=FRAME).symbols(143, 1)
    assert statuses == [(1, parity_worker.SYMBOLS, expected), (2, parity_worker.SYMBOLS, expected), (3, parity_worker.MISSING, [])]
