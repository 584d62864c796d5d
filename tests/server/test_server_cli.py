"""The `vmcast` command: help that teaches, `serve` refusing bad input, `stream ...` against a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner
from vmcast.server.cli import app

from .server_testing import Images, MulticastListener, ServerProcess, free_tcp_port, free_udp_port

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    """Exit status and output (stdout and stderr), white space folded so line wrapping does not matter."""
    result = runner.invoke(app, list(args), env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    return result.exit_code, " ".join(result.output.split())


# -- help --------------------------------------------------------------------------------------------------------


def test_vmcast_help_names_every_command() -> None:
    status, output = run("--help")
    assert status == 0
    for command in ("serve", "stream"):
        assert command in output


@pytest.mark.parametrize("command", [["serve"], ["stream", "start"], ["stream", "stop"], ["stream", "list"]])
def test_every_command_help_gives_an_example_and_the_defaults(command: list[str]) -> None:
    status, output = run(*command, "--help")
    assert status == 0
    assert "Example" in output
    assert f"vmcast {' '.join(command)} " in output.split("Example", 1)[1]
    if command == ["serve"]:
        for default in (
            "[default: 127.0.0.1]",
            "[default: 8470]",
            "[default: 239.255.0.0/16]",
            "[default: 8471]",
            "[default: 1gbit]",
            "[default: 1400]",
            "[default: 1]",
            "[default: ~/.cache/vmcast]",
            "[default: the number of --port]",
            "[default: 200mbit]",
            "[default: 30.0]",
            "[default: CACHE-DIR/state.sqlite3]",
        ):
            assert default in output
        assert "bits per second" in output and "hops" in output
        for option in ("--repair-port", "--repair-rate", "--lease-ttl", "--state-db"):
            assert option in output
    else:
        assert "[default: http://127.0.0.1:8470]" in output


# -- serve refuses bad input -------------------------------------------------------------------------------------


def test_serve_names_a_missing_images_directory(tmp_path: Path) -> None:
    status, output = run("serve", "--images", str(tmp_path / "nope"))
    assert status == 2
    assert f"error: --images: images directory '{tmp_path / 'nope'}' does not exist" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--group-range", "10.1.0.0/16", "--group-range: 10.1.0.0/16 is not inside the IPv4 multicast range"),
        ("--payload", "70000", "--payload: Input should be less than or equal to 65491"),
        ("--rate", "fast", "--rate: not a rate: 'fast'"),
        ("--interface", "192.0.2.254", "--interface: cannot send multicast by 192.0.2.254"),
        ("--qemu-img", "/nonexistent/qemu-img", "apt-get install qemu-utils"),
        ("--repair-rate", "10MB", "--repair-rate: rates are in bits per second"),
        ("--lease-ttl", "0", "--lease-ttl: Input should be greater than 0"),
        ("--repair-port", "70000", "--repair-port: Input should be less than or equal to 65535"),
    ],
)
def test_serve_refuses_bad_options_with_a_clear_message(tmp_path: Path, option: str, value: str, message: str) -> None:
    status, output = run("serve", "--images", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), option, value)
    assert status == 2
    assert message in output
    assert "Traceback" not in output


def test_serve_says_when_its_port_is_taken_and_warns_about_jumbo_payloads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, output = run(
            "serve",
            "--images",
            str(tmp_path),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--port",
            str(port),
            "--payload",
            "8000",
        )
    assert status == 2
    assert f"--port: port {port} on 127.0.0.1 is already in use" in output
    assert "warning: --payload" in output and "jumbo frames" in output


def test_serve_says_when_its_repair_port_is_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        status, output = run(
            "serve", "--images", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
            "--port", str(free_tcp_port()), "--repair-port", str(port),
        )  # fmt: skip
    assert status == 2
    assert f"--repair-port: UDP port {port} on 127.0.0.1 is already in use" in output
    assert "Traceback" not in output


def test_serve_refuses_a_state_database_another_server_uses(tmp_path: Path, images: Images) -> None:
    from vmcast.server.state import StateStore

    holder = StateStore(tmp_path / "state.sqlite3")
    try:
        status, output = run(
            "serve", "--images", str(images.directory), "--cache-dir", str(tmp_path / "cache"),
            "--port", str(free_tcp_port()), "--repair-port", "0", "--state-db", str(tmp_path / "state.sqlite3"),
        )  # fmt: skip
    finally:
        holder.close()
    assert status == 2
    assert "--state-db" in output and "in use by another vmcast serve" in output


# -- stream ... against a real server ----------------------------------------------------------------------------


@pytest.fixture
def server(images: Images, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A real `vmcast serve` process; its URL and multicast port. Stopped (SIGTERM, by pid) after the test."""
    port, mcast_port = free_tcp_port(), free_udp_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vmcast.server", "serve", "--images", str(images.directory), "--cache-dir", str(tmp_path / "cache"),
         "--port", str(port), "--mcast-port", str(mcast_port), "--rate", "20mbit", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vmcast serve did not start: {process.communicate(timeout=5)[0]}")
            time.sleep(0.1)
        yield url, mcast_port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


def test_stream_start_list_and_stop_against_a_real_server(server: tuple[str, int], images: Images) -> None:
    url, mcast_port = server
    status, output = run("stream", "start", images.qcow2, "--format", "raw", "--server", url, "--json")
    assert status == 0, output
    started = json.loads(output)
    assert started["port"] == mcast_port and started["format"] == "raw"
    with MulticastListener(started["group"], started["port"], started["cookie"]) as listener:
        assert listener.listen(0.3), "the stream is on the wire"

        status, output = run("stream", "start", images.qcow2, "--server", url)
        assert status == 0
        assert started["cookie"] in output and started["stream_id"] in output and "vmcast stream stop" in output

        status, output = run("stream", "list", "--server", url)
        assert status == 0
        assert images.qcow2 in output and started["cookie"] in output and "running" in output

        status, output = run("stream", "list", "--server", url, "--json")
        [listed] = json.loads(output)
        assert (listed["stream_id"], listed["references"]) == (started["stream_id"], 2)

        assert run("stream", "stop", started["lease_id"], "--server", url) == (
            0,
            f"lease released; stream {started['stream_id']} keeps running for 1 other lease(s)",
        )
        assert run("stream", "stop", started["lease_id"], "--server", url) == (
            0,
            "lease was already released; nothing changed",
        )
        second_lease = httpx.get(f"{url}/v1/streams").json()[0]
        assert second_lease["references"] == 1
    status, output = run("stream", "list", "--server", url)
    assert status == 0


def test_a_stream_started_with_min_receivers_says_it_holds_and_for_how_many(server: tuple[str, int], images: Images) -> None:
    url, _ = server
    status, output = run("stream", "start", images.raw, "--server", url, "--min-receivers", "3", "--max-wait", "60")
    assert status == 0, output
    assert "holding for" in output and "3 more receiver(s)" in output
    status, output = run("stream", "list", "--server", url)
    assert status == 0 and "holding (3 to come)" in output
    assert httpx.get(f"{url}/v1/streams").json()[0]["waiting_for"] == 3


def test_stopping_the_server_stops_its_streams(server: tuple[str, int], images: Images) -> None:
    url, _ = server
    started = json.loads(run("stream", "start", images.raw, "--server", url, "--json")[1])
    with MulticastListener(started["group"], started["port"], started["cookie"]) as listener:
        assert listener.listen(0.3)
        pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_server(int(p), url))
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        listener.drain()
        assert listener.listen(0.3) == []


def _is_server(pid: int, url: str) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"vmcast.server" in command and url.rsplit(":", 1)[1].encode() in command


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_an_error_answer_is_one_line_and_a_non_zero_exit(server: tuple[str, int]) -> None:
    url, _ = server
    status, output = run("stream", "start", "missing.img", "--server", url)
    assert status == 1
    assert output == "error: the server answered 404: no image named 'missing.img' in " + output.split(" in ", 1)[1]
    assert "Traceback" not in output
    status, output = run("stream", "start", "disk.raw", "--format", "vmdk", "--server", url)
    assert (status, output) == (
        1,
        "error: the server answered 422: image 'disk.raw' is not offered in format 'vmdk'; formats offered: raw, qcow2",
    )


@pytest.mark.parametrize(
    "command", [["stream", "list"], ["stream", "stop", "some-lease"], ["stream", "start", "disk.raw"]]
)
def test_an_unreachable_server_is_a_clear_message_and_a_non_zero_exit(command: list[str]) -> None:
    port = free_tcp_port()  # nothing listens there
    status, output = run(*command, "--server", f"http://127.0.0.1:{port}")
    assert status == 1
    assert (
        output
        == f"error: cannot reach the vmcast server at http://127.0.0.1:{port}: Connection refused (is `vmcast serve` running there?)"
    )


def test_serve_no_gso_sends_one_datagram_per_system_call_and_says_so(
    server_process: Callable[..., ServerProcess], images: Images, tmp_path: Path
) -> None:
    for options, batched in ((("--no-gso",), False), ((), True)):
        server = server_process(*options, "--rate", "30mbit", cache_dir=tmp_path / f"cache-{batched}").start()
        try:
            started = httpx.post(f"{server.url}/v1/streams", json={"image": images.raw}, timeout=30).json()
            with MulticastListener(started["group"], started["port"], started["cookie"]) as listener:
                assert listener.listen(0.3), "the stream is on the wire either way"
            assert httpx.get(f"{server.url}/v1/streams/{started['stream_id']}").json()["gso"] is batched
        finally:
            server.stop()


def test_serve_help_says_what_no_fec_trades() -> None:
    status, output = run("serve", "--help")
    assert status == 0
    assert "--fec" in output and "--no-fec" in output
    text = " ".join(output.replace("│", " ").split())  # the help's words, whatever the terminal width wrapped
    assert "parity" in text and "CPU" in text and "worst receiver" in text


def test_serve_announces_parity_only_with_fec(
    server_process: Callable[..., ServerProcess], images: Images, tmp_path: Path
) -> None:
    for options, scheme in ((("--fec",), "raptorq"), ((), "raptorq"), (("--no-fec",), None)):
        server = server_process(*options, "--rate", "30mbit", cache_dir=tmp_path / f"cache-{scheme}").start()
        try:
            started = httpx.post(f"{server.url}/v1/streams", json={"image": images.raw}, timeout=30).json()
            assert started["fec"] == scheme
            with MulticastListener(started["group"], started["port"], started["cookie"]) as listener:
                metadata = [json.loads(item.payload) for item in listener.listen(1.2) if item.is_metadata]
            assert metadata and all(fields.get("fec") == scheme for fields in metadata)
            assert httpx.get(f"{server.url}/v1/streams/{started['stream_id']}").json()["fec"] == scheme
        finally:
            server.stop()
