"""`vmcast receive` as a command: options, output, exit codes (typer's CliRunner, and a real process for signals)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner
from vmcast.receiver.__main__ import app

from ..page_cache import page_cache
from .receiver_testbed import LOOPBACK, minimal_metadata, sha1_of

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def direct_args(sender, output) -> list[str]:
    return ["--group", sender.group, "--port", str(sender.port), "--cookie", sender.cookie.hex(), "--output", str(output), "--interface", LOOPBACK, "--timeout", "10"]


def test_help_documents_every_exit_code():
    result = invoke("--help")
    assert result.exit_code == 0
    for code in ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "130"):
        assert re.search(rf"^\W*{code}\s+\w", result.output, re.MULTILINE), f"exit code {code} not in --help"


@pytest.mark.parametrize("args, message", [
    (["--output", "x"], "missing --group, --port, --cookie"),
    (["img", "--output", "x"], "IMAGE / --server: they go together"),
    (["--server", "http://127.0.0.1:1", "--output", "x"], "IMAGE / --server: they go together"),
    (["img", "--server", "http://127.0.0.1:1", "--group", "239.1.2.3", "--output", "x"], "--group: not with a server"),
    (["--group", "239.1.2.3", "--port", "5000", "--output", "x"], "missing --cookie"),
    (["--group", "239.1.2.3", "--port", "5000", "--cookie", "0011", "--output", "x"], "16 hex digits"),
    (["--group", "10.1.2.3", "--port", "5000", "--cookie", "00112233445566ff", "--output", "x"], "not an IPv4 multicast"),
    (["--group", "239.1.2.3", "--port", "5000", "--cookie", "00112233445566ff", "--format", "raw", "--output", "x"], "--format: needs a server"),
    (["img", "--server", "ftp://example", "--output", "x"], "http(s) URL"),
    (["img", "--server", "http://127.0.0.1:1", "--interface", "eth0", "--output", "x"], "not an IPv4 address"),
    (["img", "--server", "http://127.0.0.1:1"], "Missing option '--output'"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--fallback-after", "40"], "--fallback-after (40 s) must be shorter than --timeout (30 s)"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--rcvbuf", "lots"], "'lots' is not a size in bytes"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--rcvbuf", "1k"], "between 4k and 1g"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--rcvbuf", "2g"], "between 4k and 1g"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--name", "n"], "--name: needs --register glance or --register ec2"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--register", "s3"], "give glance or ec2"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--register", "glance", "--region", "eu-west-1"], "--region: EC2 only"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--register", "ec2", "--visibility", "public"], "--visibility: Glance only"),
    (["img", "--server", "http://127.0.0.1:1", "--output", "x", "--register", "glance", "--visibility", "everyone"], "one of private, shared"),
])
def test_mixed_or_missing_options_are_usage_errors(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split()), result.output  # rich boxes the message


def test_a_verified_receive_prints_one_line_and_exits_0(image, make_sender, tmp_path):
    sender = make_sender(image).start()
    result = invoke(*direct_args(sender, tmp_path / "out.raw"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(rf"verified sha1={sha1_of(image)} bytes={len(image)} seconds=[0-9.]+ rate=[0-9.]+ .*", lines[0])
    assert (tmp_path / "out.raw").read_bytes() == image


@pytest.mark.parametrize("keep_cache", [False, True])
def test_the_image_leaves_the_page_cache_once_verified_unless_kept(image, make_sender, tmp_path, keep_cache):
    sender = make_sender(image).start()
    result = invoke(*direct_args(sender, tmp_path / "out.raw"), *(["--keep-cache"] if keep_cache else []))
    assert result.exit_code == 0, result.output
    fd = os.open(tmp_path / "out.raw", os.O_RDONLY)
    try:
        cached, _dirty = page_cache(fd)
    finally:
        os.close(fd)
    # Dropped: synced first, so every page is clean and goes; kept: all of it is still there to be read.
    assert cached == (-(-len(image) // os.sysconf("SC_PAGE_SIZE")) if keep_cache else 0)
    assert (tmp_path / "out.raw").read_bytes() == image


def test_a_verified_line_names_what_was_received_repaired_and_fetched(image, lease_server, tmp_path):
    result = invoke("test-image", "--server", lease_server.url, "--output", str(tmp_path / "out.raw"))
    assert result.exit_code == 0, result.output
    fields = dict(field.split("=", 1) for field in result.stdout.split()[1:])
    assert fields["bytes_received"] == str(len(image)) and fields["resumed_blocks"] == "0"
    assert {"repair_requests", "repair_frames_requested", "fallback_blocks"} <= fields.keys()


def test_json_gives_the_result_with_drop_counters(image, make_sender, tmp_path):
    sender = make_sender(image, metadata=minimal_metadata(image)).start()
    result = invoke(*direct_args(sender, tmp_path / "out.raw"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["verified"] is True
    assert summary["sha1"] == sha1_of(image) and summary["bytes"] == len(image)
    assert summary["seconds"] > 0 and summary["rate"] > 0
    assert isinstance(summary["drops"], dict) and "kernel_drops" in summary and "duplicates" in summary
    for counter in ("repair_requests", "repair_frames_requested", "resumed_blocks", "bytes_received", "fallback_blocks", "fallback_bytes"):
        assert isinstance(summary[counter], int), counter
    assert summary["state_file"] == f"{tmp_path / 'out.raw'}.vmcast.json" and summary["already_verified"] is False


def test_a_refused_target_exits_3(image, make_sender, tmp_path):
    sender = make_sender(image).start()
    result = invoke(*direct_args(sender, tmp_path), "--json")  # a directory
    assert result.exit_code == 3
    assert "a directory" in result.stderr
    assert json.loads(result.stdout) == {"verified": False, "exit_code": 3, "error": f"refusing to write {tmp_path}: it is a directory, not a regular file or a block device", "error_type": "TargetRefused"}


def test_an_image_changing_under_the_stream_exits_4(image, make_sender, tmp_path):
    other = [{"sha1": "f" * 40, "len": len(image)}]
    sender = make_sender(image, rate=5e6, metadata=minimal_metadata(image), metadata_after=(0.3, other)).start()
    result = invoke(*direct_args(sender, tmp_path / "out.raw"))
    assert result.exit_code == 4, result.output
    assert "changed" in result.stderr


def test_server_errors_exit_5(lease_server, tmp_path):
    unknown = invoke("nope", "--server", lease_server.url, "--output", str(tmp_path / "out.raw"))
    assert unknown.exit_code == 5 and "no image 'nope'" in unknown.stderr
    bad_format = invoke("test-image", "--server", lease_server.url, "--format", "vhdx", "--output", str(tmp_path / "out.raw"))
    assert bad_format.exit_code == 5 and "vhdx" in bad_format.stderr
    unreachable = invoke("test-image", "--server", "http://127.0.0.1:9", "--output", str(tmp_path / "out.raw"))
    assert unreachable.exit_code == 5 and "unreachable" in unreachable.stderr


def test_a_group_that_cannot_be_joined_exits_1(tmp_path):
    result = invoke("--group", "239.255.1.2", "--port", "5000", "--cookie", "00112233445566ff", "--output", str(tmp_path / "out.raw"), "--interface", "192.0.2.254")
    assert result.exit_code == 1
    assert "cannot join 239.255.1.2:5000 on interface 192.0.2.254" in result.stderr


def test_silence_exits_6(make_sender, tmp_path):
    sender = make_sender(b"not sent")
    result = invoke(*direct_args(sender, tmp_path / "out.raw")[:-2], "--timeout", "0.5")
    assert result.exit_code == 6
    assert "no datagram" in result.stderr


def test_with_a_server_the_lease_is_taken_and_released(image, lease_server, tmp_path):
    result = invoke("test-image", "--server", lease_server.url, "--output", str(tmp_path / "out.raw"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["image"] == "test-image"
    assert lease_server.released == list(lease_server.leases) and lease_server.released


def test_sigint_exits_130_after_releasing_the_lease_and_progress_is_shown_meanwhile(lease_server, tmp_path):
    lease_server.sender_options = {"rate": 0.5e6}  # ~6 s for the image: still running when interrupted
    process = subprocess.Popen(
        [sys.executable, "-m", "vmcast.receiver", "test-image", "--server", lease_server.url, "--output", str(tmp_path / "out.raw")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.monotonic() + 15
        progress = ""
        while "MiB" not in progress:  # the first plain progress line (stderr is a pipe, not a terminal)
            assert time.monotonic() < deadline and process.poll() is None, "no progress line"
            progress = process.stderr.readline()
        assert re.search(r"receiving [0-9.]+/3\.0 MiB \([0-9.]+%\) [0-9.]+ MB/s ETA [0-9.]+ s", progress), progress
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, errors
    assert "interrupted by SIGINT" in errors
    assert lease_server.released == list(lease_server.leases) and lease_server.released
    state = json.loads((tmp_path / "out.raw.vmcast.json").read_text())  # saved on the way out: a re-run resumes
    assert state["image"] == "test-image" and state["verified"] is False and state["len"] == 3 * (1 << 20) + 12_345
