"""HTTP Range headers (RFC 9110 section 14) -> what the unicast fallback sends. Pure: no server needed."""

from __future__ import annotations

import pytest
from vmcast.server.byte_ranges import ByteRange, Unsatisfiable, parse_range

LENGTH = 1000


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=0-499", 0, 499),
        ("bytes=500-999", 500, 999),
        ("bytes=500-5000", 500, 999),  # the end is clamped to the last byte
        ("bytes=900-", 900, 999),
        ("bytes=-100", 900, 999),
        ("bytes=-5000", 0, 999),  # a suffix longer than the representation: all of it
        ("Bytes = 10 - 19", 10, 19),  # unit case-insensitive, white space tolerated
        ("bytes=2000-3000, 10-19", 10, 19),  # several: the first satisfiable one
        ("bytes=0-9,20-29", 0, 9),
    ],
)
def test_a_satisfiable_range_is_served_as_one_206_part(header: str, first: int, last: int) -> None:
    assert parse_range(header, LENGTH) == ByteRange(first=first, last=last, length=LENGTH)


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=5000-,-0"])
def test_a_range_outside_the_representation_is_416(header: str) -> None:
    answer = parse_range(header, LENGTH)
    assert answer == Unsatisfiable(length=LENGTH)
    assert answer.content_range == "bytes */1000"


def test_every_range_of_an_empty_image_is_416() -> None:
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        assert parse_range(header, 0) == Unsatisfiable(length=0)


@pytest.mark.parametrize(
    "header",
    [None, "", "items=0-9", "bytes", "bytes=", "bytes=a-b", "bytes=9-3", "bytes=1-2-3", "bytes=0-9,", "bytes=--1",
     "bytes=" + "0-1," * 2000],
)  # fmt: skip
def test_no_header_or_one_that_does_not_parse_means_the_whole_representation(header: str | None) -> None:
    assert parse_range(header, LENGTH) is None


def test_content_range_names_the_bytes_sent_and_the_whole_length() -> None:
    answer = parse_range("bytes=10-19", LENGTH)
    assert isinstance(answer, ByteRange)
    assert (answer.content_range, answer.size) == ("bytes 10-19/1000", 10)
