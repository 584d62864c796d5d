"""Settings refuse bad input with messages that say what is wrong."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from pydantic import ValidationError
from vmcast.server.settings import LARGEST_UNFRAGMENTED_PAYLOAD, MAX_PAYLOAD, Settings, get_settings, payload_warning


def problem(tmp_path: Path, **fields: object) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**({"images_dir": tmp_path} | fields))
    return " ".join(error["msg"] for error in caught.value.errors())


def test_defaults_stay_on_this_machine(tmp_path: Path) -> None:
    settings = Settings(images_dir=tmp_path)
    assert (settings.host, settings.port, settings.interface, settings.ttl) == ("127.0.0.1", 8470, "127.0.0.1", 1)
    assert settings.group_range == ipaddress.IPv4Network("239.255.0.0/16")
    assert (settings.mcast_port, settings.rate, settings.payload) == (8471, 1_000_000_000, 1400)
    assert settings.gso, "UDP GSO batching is on unless asked off (the sender falls back by itself)"
    assert settings.cache_dir.name == "vmcast"


def test_a_missing_images_directory_is_named(tmp_path: Path) -> None:
    assert f"images directory '{tmp_path / 'nope'}' does not exist" in problem(tmp_path, images_dir=tmp_path / "nope")
    (tmp_path / "file").touch()
    assert "is not a directory" in problem(tmp_path, images_dir=tmp_path / "file")


@pytest.mark.parametrize(
    ("group_range", "message"),
    [
        ("10.0.0.0/8", "not inside the IPv4 multicast range 224.0.0.0/4"),
        ("239.255.0.1/16", "has host bits set; did you mean 239.255.0.0/16?"),
        ("224.0.0.0/16", "overlaps 224.0.0.0/24"),
        ("multicast please", "not an IPv4 network"),
        ("239.255.0.0/40", "bad prefix length"),
    ],
)
def test_a_bad_group_range_is_explained(tmp_path: Path, group_range: str, message: str) -> None:
    assert message in problem(tmp_path, group_range=group_range)


def test_a_rate_is_parsed_and_garbage_is_explained(tmp_path: Path) -> None:
    assert Settings(images_dir=tmp_path, rate="300mbit").rate == 300_000_000
    assert Settings(images_dir=tmp_path, rate="0").rate == 0
    assert "expected a number of bits per second" in problem(tmp_path, rate="lightspeed")


def test_the_payload_must_fit_a_datagram(tmp_path: Path) -> None:
    assert MAX_PAYLOAD == 65507 - 16
    assert Settings(images_dir=tmp_path, payload=MAX_PAYLOAD).payload == MAX_PAYLOAD
    assert "less than or equal to 65491" in problem(tmp_path, payload=MAX_PAYLOAD + 1)
    assert "greater than or equal to 1" in problem(tmp_path, payload=0)


def test_payloads_beyond_a_1500_byte_mtu_are_warned_about() -> None:
    assert LARGEST_UNFRAGMENTED_PAYLOAD == 1500 - 28 - 16
    assert payload_warning(1400) is None
    assert payload_warning(LARGEST_UNFRAGMENTED_PAYLOAD) is None
    warning = payload_warning(8000)
    assert warning is not None and "jumbo frames" in warning and "fragment" in warning


def test_settings_come_from_vmcast_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMCAST_IMAGES_DIR", str(tmp_path))
    monkeypatch.setenv("VMCAST_RATE", "2.5g")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert (settings.images_dir, settings.rate) == (tmp_path.resolve(), 2_500_000_000)
    finally:
        get_settings.cache_clear()
