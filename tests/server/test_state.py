"""The state database: real SQLite files, their schema version, refusals that say what to do, and write costs."""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from pathlib import Path

import pytest
from vmcast.server.errors import ConfigurationError
from vmcast.server.state import SCHEMA_VERSION, StateStore, StoredLease, StoredStream


def stream(stream_id: str = "s1", group: str = "239.255.0.1") -> StoredStream:
    return StoredStream(
        stream_id=stream_id, image="disk.raw", format="raw", sha1="ab" * 20, frame_size=1400,
        group=ipaddress.IPv4Address(group), port=8471, cookie=bytes(range(8)), created_at=1.5,
    )  # fmt: skip


def lease(lease_id: str, stream_id: str = "s1") -> StoredLease:
    return StoredLease(lease_id=lease_id, stream_id=stream_id, created_at=2.0, renewed_at=2.0)


def test_streams_and_leases_written_are_read_back_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = StateStore(path)
    store.add_lease(lease("l1"), new_stream=stream(), next_group=7)
    store.add_lease(lease("l2"))
    store.add_lease(lease("l3", "s2"), new_stream=stream("s2", "239.255.0.2"), next_group=8)
    store.renew("l2", at=9.0)
    store.remove(lease_ids=("l3",), stream_ids=("s2",))
    store.close()

    again = StateStore(path)
    loaded = again.load()
    again.close()
    assert loaded.next_group == 8
    [(recorded, leases)] = loaded.streams
    assert recorded == stream()
    assert [(item.lease_id, item.renewed_at) for item in leases] == [("l1", 2.0), ("l2", 9.0)]


def test_a_stream_left_without_leases_is_forgotten_at_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    store.add_lease(lease("l1"), new_stream=stream())
    store.remove(lease_ids=("l1",))
    assert store.load().streams == ()
    store.close()


def test_the_database_is_in_wal_mode_with_the_current_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateStore(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_database_of_a_newer_vmcast_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigurationError, match=r"--state-db: .* made by a newer vmcast"):
        StateStore(path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigurationError, match=r"--state-db: .* is not a usable vmcast state database"):
        StateStore(path)


def test_two_servers_cannot_share_one_database(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = StateStore(path)
    with pytest.raises(ConfigurationError, match=r"in use by another vmcast serve"):
        StateStore(path)
    first.close()
    StateStore(path).close()  # free again once the first is closed


def test_a_renewal_costs_well_under_a_millisecond_so_it_is_written_through(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    store.add_lease(lease("l1"), new_stream=stream())
    for index in range(2, 1001):
        store.add_lease(lease(f"l{index}"))
    count = 2000
    began = time.perf_counter()
    for index in range(count):
        store.renew(f"l{index % 1000 + 1}", at=float(index))
    each = (time.perf_counter() - began) / count
    store.close()
    # 10,000 receivers renewing every 10 s make 1,000 renewals a second: this is the share of one core they take.
    print(f"\nrenewal write-through: {each * 1e6:.0f} us each (1,000 leases, WAL, synchronous=NORMAL, one core)")
    assert each < 0.002
