"""End to end over real loopback multicast: `vmcast serve` and three `vmcast receive` processes."""

import re
import subprocess
import time

import httpx

from .processes import random_image_dir, receiver_result, running_server, sha1_of, start_receiver, write_random_image

IMAGE_MIB = 64


def test_three_receivers_one_joining_mid_loop_all_hold_verified_identical_copies(tmp_path):
    images, expected = random_image_dir(tmp_path, IMAGE_MIB)
    # Paced so the 64 MiB loop lasts about two seconds: the late receiver surely joins mid-loop.
    with running_server(images, tmp_path, "--rate", "300mbit") as url:
        outputs = [tmp_path / f"out-{i}.raw" for i in range(3)]
        receivers = [
            start_receiver("disk.raw", "--server", url, "--output", str(outputs[i]), log=tmp_path / f"r{i}.log")
            for i in range(2)
        ]
        deadline = time.monotonic() + 20
        while not httpx.get(f"{url}/v1/streams").json() or httpx.get(f"{url}/v1/streams").json()[0]["bytes_sent"] < (IMAGE_MIB << 20) // 3:
            assert time.monotonic() < deadline, "the stream never got going"
            time.sleep(0.05)
        receivers.append(start_receiver("disk.raw", "--server", url, "--output", str(outputs[2]), log=tmp_path / "r2.log"))

        results = [receiver_result(r, timeout=120) for r in receivers]
        for index, (code, summary) in enumerate(results):
            log = (tmp_path / f"r{index}.log").read_text()[-2000:]
            assert code == 0, f"receiver {index} exited {code}: {log}"
            assert summary["sha1"] == expected
            assert sha1_of(outputs[index]) == expected

        # Every receiver released its lease: the stream stops and disappears.
        deadline = time.monotonic() + 5
        while any(s.get("references", 0) > 0 for s in httpx.get(f"{url}/v1/streams").json()):
            assert time.monotonic() < deadline, "leases were not released"
            time.sleep(0.1)


def test_a_qcow2_image_is_received_as_raw_identical_to_qemu_img_convert(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    source = tmp_path / "source.raw"
    write_random_image(source, 8)
    with source.open("r+b") as handle:
        handle.truncate(24 << 20)  # 16 MiB of zeros at the end, as VM images have
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source), str(images / "vm.qcow2")], check=True)
    expected = sha1_of(source)
    with running_server(images, tmp_path, "--rate", "0") as url:
        receiver = start_receiver("vm.qcow2", "--format", "raw", "--server", url, "--output", str(tmp_path / "vm.raw"), log=tmp_path / "r.log")
        code, summary = receiver_result(receiver, timeout=120)
    assert code == 0, (tmp_path / "r.log").read_text()[-2000:]
    assert sha1_of(tmp_path / "vm.raw") == expected == summary["sha1"]



def test_receivers_that_lose_frames_are_repaired_by_parity_and_all_hold_verified_identical_copies(tmp_path):
    # Real loss on loopback: each receiver has a small socket buffer and is stopped (SIGSTOP) for a moment
    # while the stream runs, so the kernel drops what arrives meanwhile: a different stretch for each. One
    # stall each: repaired with parity (only a socket that keeps overflowing asks for frames).
    from ..receiver.real_server import pause, wait_for_line

    images, expected = random_image_dir(tmp_path, 32)
    with running_server(images, tmp_path, "--rate", "150mbit", "--fec") as url:  # ~1.9 s a loop
        outputs = [tmp_path / f"out-{i}.raw" for i in range(2)]
        logs = [tmp_path / f"r{i}.log" for i in range(2)]
        lossy = ("--rcvbuf", "64k", "--no-fallback")
        receivers = [
            start_receiver("disk.raw", "--server", url, "--output", str(outputs[i]), *lossy, log=logs[i]) for i in range(2)
        ]
        for log in logs:
            wait_for_line(log, "carousel frames come from port")  # following the carousel: losses are asked for
        [stream] = httpx.get(f"{url}/v1/streams").json()
        assert stream["fec"] == "raptorq"
        pause(receivers[0], 0.1)
        time.sleep(0.2)
        pause(receivers[1], 0.1)
        results = [receiver_result(r, timeout=60) for r in receivers]
        stream = httpx.get(f"{url}/v1/streams/{stream['stream_id']}").json()  # stopped by now; counters kept
    for index, (code, summary) in enumerate(results):
        log = logs[index].read_text()[-2000:]
        assert code == 0, f"receiver {index} exited {code}: {log}"
        assert summary["sha1"] == expected and sha1_of(outputs[index]) == expected
        assert summary["kernel_drops"] > 0, f"receiver {index} lost nothing: the test tested no repair"
        assert summary["recovered_blocks"] > 0 and summary["repair_parity_requested"] > 0, summary
        assert summary["fallback_blocks"] == 0
    assert stream["parity_frames_sent"] > 0 and stream["parity_jobs"] > 0, stream


def test_receivers_started_apart_with_min_receivers_share_one_loop_that_starts_when_the_last_joins(tmp_path):
    images, expected = random_image_dir(tmp_path, 32)
    frames = -(-(32 << 20) // 1400)
    with running_server(images, tmp_path, "--rate", "300mbit") as url:
        outputs = [tmp_path / f"out-{i}.raw" for i in range(2)]
        hold = ("--min-receivers", "2", "--max-wait", "60")
        first = start_receiver("disk.raw", "--server", url, "--output", str(outputs[0]), *hold, log=tmp_path / "r0.log")
        deadline = time.monotonic() + 20
        while not (streams := httpx.get(f"{url}/v1/streams").json()):
            assert time.monotonic() < deadline, "the first receiver never took its lease"
            time.sleep(0.05)
        stream_id = streams[0]["stream_id"]
        time.sleep(2.0)  # without the hold, 2 s at 300 Mbit/s is more than two whole loops of this image
        held = httpx.get(f"{url}/v1/streams/{stream_id}").json()
        assert (held["waiting_for"], held["loops_completed"]) == (1, 0)
        assert held["datagrams_sent"] < 50, "only metadata while the stream holds"
        second = start_receiver("disk.raw", "--server", url, "--output", str(outputs[1]), *hold, log=tmp_path / "r1.log")

        for index, process in enumerate((first, second)):
            code, summary = receiver_result(process, timeout=120)
            assert code == 0, (tmp_path / f"r{index}.log").read_text()[-2000:]
            assert summary["sha1"] == expected == sha1_of(outputs[index])
        final = httpx.get(f"{url}/v1/streams/{stream_id}").json()
    # Both joined before the first data frame left: one loop serves both (plus metadata, and what leaves
    # while the receivers hash, sync and release: far less than the two loops a 2 s head start would cost).
    assert final["datagrams_sent"] < frames * 1.5, f"{final['datagrams_sent']} datagrams for {frames} frames"


def test_receivers_started_before_the_stream_wait_for_it_and_share_its_first_loop(tmp_path):
    # Like udp-receiver before udp-sender: the receivers wait; an operator starts the stream for both.
    images, expected = random_image_dir(tmp_path, 32)
    frames = -(-(32 << 20) // 1400)
    with running_server(images, tmp_path, "--rate", "300mbit") as url:
        outputs = [tmp_path / f"out-{i}.raw" for i in range(2)]
        receivers = [
            start_receiver("disk.raw", "--server", url, "--output", str(output), "--wait-for-stream", "60", log=tmp_path / f"r{i}.log")
            for i, output in enumerate(outputs)
        ]
        time.sleep(3.0)  # long enough for both to start and wait
        assert httpx.get(f"{url}/v1/streams").json() == [], "a waiting receiver starts no stream"
        assert all(process.poll() is None for process in receivers), "both still waiting"
        operator = httpx.post(f"{url}/v1/streams", json={"image": "disk.raw", "min_receivers": 2, "max_wait": 60}).json()
        assert operator["waiting_for"] == 2, "the operator's own lease does not count as a receiver"

        for index, process in enumerate(receivers):
            code, summary = receiver_result(process, timeout=120)
            assert code == 0, (tmp_path / f"r{index}.log").read_text()[-2000:]
            assert summary["sha1"] == expected == sha1_of(outputs[index])
        final = httpx.get(f"{url}/v1/streams/{operator['stream_id']}").json()
        assert final["references"] == 1, "the receivers released their leases; the operator's remains"
        assert final["datagrams_sent"] < frames * 1.5, f"{final['datagrams_sent']} datagrams for {frames} frames"
        httpx.delete(f"{url}/v1/leases/{operator['lease_id']}")
    for index in range(2):
        assert "waiting up to 60 s for a stream of disk.raw" in (tmp_path / f"r{index}.log").read_text()
    # Each joined the group the long poll named before it took its lease, which counted as joined at once.
    granted = [line for line in next(tmp_path.glob("server-*.log")).read_text().splitlines() if re.search(r"lease \S+ on stream", line)]
    assert len(granted) == 3 and sum(line.endswith("references, joined") for line in granted) == 2, granted


def test_a_receiver_waiting_for_a_stream_nobody_starts_gives_up_with_exit_6_and_starts_nothing(tmp_path):
    images, _ = random_image_dir(tmp_path, 1)
    with running_server(images, tmp_path) as url:
        process = start_receiver("disk.raw", "--server", url, "--output", str(tmp_path / "out.raw"), "--wait-for-stream", "1.5", log=tmp_path / "r.log")
        code, summary = receiver_result(process, timeout=60)
        assert code == 6, (tmp_path / "r.log").read_text()
        assert "no stream of 'disk.raw' as raw started" in summary["error"] and "within 1.5 s" in summary["error"]
        assert httpx.get(f"{url}/v1/streams").json() == []
        assert not (tmp_path / "out.raw").exists(), "nothing written while waiting"
