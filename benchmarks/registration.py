"""Registration throughput: one mostly-zero image into Glance and into EBS (moto), on this machine's loopback.

    python -m benchmarks.registration [--size-mib 1024] [--zero-percent 80] [--parallelism 8] [--runs 1]

The image is `--size-mib` MiB in 512 KiB blocks, of which `--zero-percent` are zeros and the others random,
spread evenly (block i holds data when it falls on the data fraction's stride), so the EBS path can skip the
zero blocks and Glance, which stores every byte, cannot. The servers are those of tests/services/clouds.sh
(started here if they are not running, and then stopped again): Glance under gunicorn (1 worker, 8 threads,
file store on this disk, behind Keystone), moto_server in memory. Client, servers and disk share this
machine's cores, so figures are a floor for the client code, not a cloud's speed.

For each cloud it prints wall time, MB/s of image (10**6 bytes of the whole image per second, from the call
to the registered result: format check, idempotence lookup, upload, the cloud's verification), MB/s of bytes
actually sent, bytes skipped as zeros, and this process's CPU seconds. For comparison it first measures the
local limits: one read of the image with SHA-1 (what `verify_file` does) and with SHA-1 + SHA-512 + MD5 (what
the Glance upload hashes).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmcast.receiver.registration import register_in_ec2, register_in_glance
from vmcast.receiver.registration.ec2 import EBS_BLOCK_SIZE
from vmcast.receiver.verified import verify_file

CLOUDS_SH = Path(__file__).resolve().parent.parent / "tests" / "services" / "clouds.sh"
SERVICES = ("keystone", "glance", "moto")


def clouds_sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLOUDS_SH), *args], capture_output=True, text=True, check=check)


def bring_up() -> list[str]:
    """Start the services that do not answer; return the ones this run started (to stop them after)."""
    if clouds_sh("status", check=False).returncode == 0:
        return []
    clouds_sh("install")
    done = clouds_sh("start", check=False)
    started = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("spawned ")]
    if done.returncode != 0:
        if started:
            clouds_sh("stop", *started, check=False)
        sys.exit(f"cannot start the cloud servers:\n{done.stderr[-2000:]}")
    return started


def load_env() -> None:
    for line in clouds_sh("env").stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            os.environ[name] = value


def write_image(path: Path, *, size: int, zero_percent: float) -> tuple[str, int]:
    """Write the image; return its SHA-1 and the number of data (non-zero) blocks."""
    blocks = size // EBS_BLOCK_SIZE
    data_fraction = 1 - zero_percent / 100
    sha1 = hashlib.sha1()
    data_blocks = 0
    zero = bytes(EBS_BLOCK_SIZE)
    with open(path, "wb") as file:
        for index in range(blocks):
            # Block i holds data when the running count of data blocks wants one more: even spread.
            if int((index + 1) * data_fraction) > data_blocks:
                block = os.urandom(EBS_BLOCK_SIZE)
                data_blocks += 1
            else:
                block = zero
            file.write(block)
            sha1.update(block)
    return sha1.hexdigest(), data_blocks


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def local_limits(path: Path, size: int) -> dict[str, float]:
    results = {}
    for label, names in (("read + sha1", ("sha1",)), ("read + sha1 + sha512 + md5", ("sha1", "sha512", "md5"))):
        hashes = [hashlib.new(name) for name in names]
        started = time.perf_counter()
        with open(path, "rb", buffering=0) as file:
            while chunk := file.read(4 * 1024 * 1024):
                for digest in hashes:
                    digest.update(chunk)
        results[label] = size / (time.perf_counter() - started) / 1e6
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--zero-percent", type=float, default=80.0)
    parser.add_argument("--parallelism", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024

    started_services = bring_up()
    try:
        load_env()
        import boto3
        import openstack

        rows = []
        with tempfile.TemporaryDirectory(prefix="vmcast-bench-") as work:
            path = Path(work) / "bench.raw"
            for run in range(args.runs):
                sha1, data_blocks = write_image(path, size=size, zero_percent=args.zero_percent)
                if run == 0:
                    limits = local_limits(path, size)
                image = verify_file(path, expected_sha1=sha1)

                connection = openstack.connect(cloud="vmcast-test")
                cpu, wall = cpu_seconds(), time.perf_counter()
                glance = register_in_glance(image, connection=connection, name=f"bench-{sha1[:12]}")
                rows.append(("glance", time.perf_counter() - wall, cpu_seconds() - cpu, glance.bytes_uploaded, 0))
                connection.image.delete_image(glance.id)
                connection.close()

                session = boto3.Session()
                cpu, wall = cpu_seconds(), time.perf_counter()
                ec2 = register_in_ec2(image, name=f"bench-{sha1[:12]}", session=session, parallelism=args.parallelism, wait_delay=0.2)
                rows.append(("ebs (moto)", time.perf_counter() - wall, cpu_seconds() - cpu, ec2.bytes_uploaded, ec2.zero_blocks_skipped * EBS_BLOCK_SIZE))
                client = session.client("ec2")
                client.deregister_image(ImageId=ec2.id)
                client.delete_snapshot(SnapshotId=ec2.snapshot_id)
    finally:
        if started_services:
            clouds_sh("stop", *started_services, check=False)

    print(
        f"image {args.size_mib} MiB ({size} bytes), {args.zero_percent:g}% zero in 512 KiB blocks "
        f"({data_blocks} data blocks of {size // EBS_BLOCK_SIZE}); EBS parallelism {args.parallelism}; "
        f"{os.cpu_count()} cores shared by client and servers; Python {platform.python_version()}; {args.runs} run(s)"
    )
    print("local limits (this disk, page cache warm): " + ", ".join(f"{label} {rate:.0f} MB/s" for label, rate in limits.items()))
    print(f"{'cloud':<12} {'seconds':>8} {'image MB/s':>11} {'sent MB':>9} {'sent MB/s':>10} {'zero MB skipped':>16} {'client CPU s':>13}")
    for cloud, seconds, cpu, sent, skipped in rows:
        print(f"{cloud:<12} {seconds:8.2f} {size / seconds / 1e6:11.1f} {sent / 1e6:9.1f} {sent / seconds / 1e6:10.1f} {skipped / 1e6:16.1f} {cpu:13.2f}")


if __name__ == "__main__":
    main()
