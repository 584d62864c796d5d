"""Fuzzing the assembly with random and mutated datagrams: no exception, never complete with wrong data."""

import hashlib
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from vmcast.protocol import Assembly, AssemblyState, BlockCorrupt, DataReceived, MetadataReceived, encode_data, encode_metadata, manifest_of

COOKIE = b"fuzzfuzz"
IMAGE = random.Random(7).randbytes(9_000)
MANIFEST = manifest_of(IMAGE, frame_size=1000, block_size=3000)
GOOD = [encode_metadata(COOKIE, f) for f in MANIFEST.metadata_frames()] + [
    encode_data(COOKIE, o, IMAGE[o : o + 1000]) for o in range(0, len(IMAGE), 1000)
]


def mutate(datagram: bytes, rng: random.Random) -> bytes:
    data = bytearray(datagram)
    kind = rng.randrange(5)
    if kind == 0 and data:  # flip bits anywhere, header included
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:  # extend
        data += rng.randbytes(rng.randint(1, 50))
    elif kind == 3:  # splice two datagrams
        other = rng.choice(GOOD)
        cut = rng.randrange(len(data) + 1)
        data = data[:cut] + other[cut:]
    else:  # pure noise with our cookie
        data = bytearray(COOKIE + rng.randbytes(rng.randint(0, 60)))
    return bytes(data)


def drive(assembly: Assembly, disk: bytearray, datagram: bytes) -> None:
    """Feed like a real receiver: write, check blocks against the disk, check the image."""
    event = assembly.receive_datagram(datagram)
    ready = ()
    if isinstance(event, DataReceived):
        disk[event.offset : event.offset + len(event.payload)] = event.payload
        ready = () if event.completed_block is None else (event.completed_block,)
    elif isinstance(event, MetadataReceived):
        ready = event.blocks_to_check
    for block in ready:
        start, end = assembly.layout.block_span(block)
        assembly.check_block(block, disk[start:end])
    if assembly.state is AssemblyState.VERIFYING_IMAGE:
        assembly.check_image(hashlib.sha1(disk).hexdigest())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(seed=st.integers(0, 2**32), mutation_rate=st.sampled_from([0.05, 0.3, 0.9]))
def test_mutated_streams_never_raise_and_never_complete_with_wrong_bytes(seed, mutation_rate):
    rng = random.Random(seed)
    assembly = Assembly(cookie=COOKIE)
    disk = bytearray(len(IMAGE))
    for _ in range(200):
        datagram = rng.choice(GOOD)
        if rng.random() < mutation_rate:
            datagram = mutate(datagram, rng)
        drive(assembly, disk, datagram)
        if assembly.state is AssemblyState.COMPLETE:
            assert bytes(disk) == IMAGE
            break


@settings(max_examples=200, deadline=None)
@given(datagrams=st.lists(st.binary(max_size=80).map(lambda b: COOKIE + b), max_size=40))
def test_random_datagrams_with_our_cookie_never_raise(datagrams):
    assembly = Assembly(cookie=COOKIE)
    disk = bytearray(len(IMAGE))
    drive(assembly, disk, GOOD[0])
    for datagram in datagrams:
        drive(assembly, disk, datagram)
    assert assembly.state is not AssemblyState.COMPLETE or bytes(disk) == IMAGE
