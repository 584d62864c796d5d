"""Resuming an interrupted receive from the state file beside the output, against the real server."""

from __future__ import annotations

import os
import signal
import time

from .real_server import (
    log_tail,
    receiver_result,
    sha1_of,
    start_receiver,
    state_of,
    write_random_image,
)

# 16 MiB at the shared server's rate: about 3 s a loop, so the first checkpoint (after 2 s) comes well before the end.
IMAGE_MIB = 16


def kill_after_first_checkpoint(receiver, output, *, min_blocks: int = 2, timeout: float = 20.0) -> dict:
    """SIGKILL the receiver (no cleanup at all) once its state file claims `min_blocks` verified blocks."""
    deadline = time.monotonic() + timeout
    while True:
        state = state_of(output)
        if state is not None and state["verified_block_count"] >= min_blocks:
            break
        assert receiver.poll() is None, "the receiver ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint with {min_blocks} blocks: {state}"
        time.sleep(0.05)
    receiver.send_signal(signal.SIGKILL)
    receiver.wait()
    assert not state["verified"] and state["verified_block_count"] < state["block_count"]
    return state


def test_a_killed_receive_resumes_from_its_verified_blocks_and_a_rerun_of_a_verified_one_returns_at_once(tmp_path, real_server):
    url, expected, output = real_server.url, real_server.sha1["resume.raw"], tmp_path / "out.raw"
    first = start_receiver("resume.raw", "--server", url, "--output", str(output), log=tmp_path / "r1.log")
    checkpoint = kill_after_first_checkpoint(first, output)
    assert checkpoint["sha1"] == expected and checkpoint["image"] == "resume.raw" and checkpoint["len"] == IMAGE_MIB << 20

    # The same command again: no --force needed for the file the state file says is ours.
    second = start_receiver("resume.raw", "--server", url, "--output", str(output), log=tmp_path / "r2.log")
    code, summary = receiver_result(second, timeout=60)
    assert code == 0, log_tail(tmp_path / "r2.log")
    assert summary["sha1"] == expected == sha1_of(output)
    assert summary["resumed_blocks"] >= checkpoint["verified_block_count"]
    assert summary["bytes_received"] < IMAGE_MIB << 20, "the resumed blocks were received again"
    assert "resuming the interrupted receive: " in (tmp_path / "r2.log").read_text()
    state = state_of(output)
    assert state["verified"] is True and state["verified_block_count"] == state["block_count"] == IMAGE_MIB

    # Once more: the file is hashed again, nothing is received.
    third = start_receiver("resume.raw", "--server", url, "--output", str(output), log=tmp_path / "r3.log")
    code, summary = receiver_result(third, timeout=30)
    assert code == 0, log_tail(tmp_path / "r3.log")
    assert summary["already_verified"] is True and summary["sha1"] == expected
    assert summary["datagrams"] == 0 and summary["bytes_received"] == 0


def test_an_image_that_changed_since_the_interrupted_receive_is_received_again_from_the_start(tmp_path, real_server):
    url, old, output = real_server.url, real_server.sha1["changing.raw"], tmp_path / "out.raw"
    first = start_receiver("changing.raw", "--server", url, "--output", str(output), log=tmp_path / "r1.log")
    kill_after_first_checkpoint(first, output)

    # A new version under the same name (a new file renamed over it, as a publisher would).
    new = write_random_image(tmp_path / "new.raw", 4)
    os.replace(tmp_path / "new.raw", real_server.images / "changing.raw")
    second = start_receiver("changing.raw", "--server", url, "--output", str(output), log=tmp_path / "r2.log")
    code, summary = receiver_result(second, timeout=60)
    log = (tmp_path / "r2.log").read_text()
    assert code == 0, log[-3000:]
    assert f"image changing.raw changed since the interrupted receive (sha1 {old} → {new}); starting over" in log
    assert summary["sha1"] == new == sha1_of(output) and summary["resumed_blocks"] == 0
    assert output.stat().st_size == 4 << 20
    assert state_of(output)["sha1"] == new
