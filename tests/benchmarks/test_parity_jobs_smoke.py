"""The parity-job benchmark (benchmarks/parity_jobs.py) on a tiny image, with the real worker processes: both
ways of handing a block over make a job for every block, and the numbers are printed."""

import re

from benchmarks import parity_jobs


def test_both_modes_do_a_job_per_block_and_print_their_costs(capsys):
    assert parity_jobs.main(["--size-mib", "3", "--runs", "1", "--symbols", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("3 MiB, 2 symbols per block")
    rows = [dict(re.findall(r"(\w+) (\S+)", line)) for line in lines[1:]]
    assert [row["mode"] for row in rows] == ["file", "inline"]
    for row in rows:
        assert row["jobs"] == row["blocks"] == "4"  # 3 MiB in blocks of 720 x 1456 bytes
        assert float(row["workers_cpu_seconds"]) > 0
