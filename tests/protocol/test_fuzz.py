"""Fuzzing the assembly with random and mutated datagrams, parity frames included: no exception, never
complete with wrong data."""

import hashlib
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from vmcast.protocol import (
    PARITY_FLAG,
    Assembly,
    AssemblyState,
    BlockRecovered,
    DataReceived,
    MetadataReceived,
    ParityEncoder,
    ParityReceived,
    encode_data,
    encode_metadata,
    encode_parity_header,
    manifest_of,
)

COOKIE = b"fuzzfuzz"
IMAGE = random.Random(7).randbytes(9_000)
MANIFEST = manifest_of(IMAGE, frame_size=1000, block_size=3000)
GOOD = [encode_metadata(COOKIE, f) for f in MANIFEST.metadata_frames()] + [
    encode_data(COOKIE, o, IMAGE[o : o + 1000]) for o in range(0, len(IMAGE), 1000)
]
assert MANIFEST.fec  # frames of 1000 bytes (a multiple of 8): the stream announces parity
# Real parity frames: six repair symbols of each of the three blocks.
PARITY = [
    encode_parity_header(COOKIE, block=block, esi=esi) + symbol
    for block in range(3)
    for esi, symbol in enumerate(ParityEncoder(IMAGE[block * 3000 : (block + 1) * 3000], frame_size=1000).symbols(3, 6), start=3)
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
    decodable = None
    if isinstance(event, DataReceived):
        disk[event.offset : event.offset + len(event.payload)] = event.payload
        ready = () if event.completed_block is None else (event.completed_block,)
        decodable = event.decodable_block
    elif isinstance(event, MetadataReceived):
        ready = event.blocks_to_check
    elif isinstance(event, ParityReceived) and event.decodable:
        decodable = event.block
    if decodable is not None:
        start, end = assembly.layout.block_span(decodable)
        recovered = assembly.recover_block(decodable, disk[start:end])
        if isinstance(recovered, BlockRecovered):
            for offset, payload in recovered.frames:
                disk[offset : offset + len(payload)] = payload
            ready = (decodable,) if recovered.checksum_known else ()
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


def mutate_parity(datagram: bytes, rng: random.Random) -> bytes:
    data = bytearray(datagram)
    kind = rng.randrange(4)
    if kind == 0:  # another block or ESI: the symbol no longer matches its id
        offset = int.from_bytes(data[8:16], "big") ^ (1 << rng.randrange(40))
        data[8:16] = offset.to_bytes(8, "big")
    elif kind == 1:  # wrong symbol bytes
        data[16 + rng.randrange(len(data) - 16)] ^= 1 << rng.randrange(8)
    elif kind == 2:  # wrong size
        data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + rng.randbytes(rng.randint(1, 9))
    else:  # any offset with the parity flag, any payload
        data = bytearray(COOKIE + (PARITY_FLAG | rng.getrandbits(63)).to_bytes(8, "big") + rng.randbytes(rng.choice([0, 999, 1000, 1001])))
    return bytes(data)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(seed=st.integers(0, 2**32), loss=st.sampled_from([0.2, 0.5]), mutation_rate=st.sampled_from([0.1, 0.5, 1.0]))
def test_mutated_parity_never_raises_and_never_completes_with_wrong_bytes(seed, loss, mutation_rate):
    rng = random.Random(seed)
    assembly = Assembly(cookie=COOKIE)
    disk = bytearray(len(IMAGE))
    for datagram in GOOD[:1] + [d for d in GOOD[1:] if rng.random() >= loss]:
        drive(assembly, disk, datagram)
    for _ in range(60):  # parity, mostly damaged, and now and then a data frame
        if rng.random() < 0.2:
            datagram = rng.choice(GOOD)
        else:
            datagram = rng.choice(PARITY)
            if rng.random() < mutation_rate:
                datagram = mutate_parity(datagram, rng)
        drive(assembly, disk, datagram)
        if assembly.state is AssemblyState.COMPLETE:
            assert bytes(disk) == IMAGE
            break
    assert assembly.parity_bytes <= 3 * (3 + 2) * 1000  # never more than missing + spare per block


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_good_parity_completes_what_loss_left_out(seed):
    rng = random.Random(seed)
    assembly = Assembly(cookie=COOKIE)
    disk = bytearray(len(IMAGE))
    kept = [d for d in GOOD[1:] if rng.random() >= 0.3]
    for datagram in GOOD[:1] + kept + PARITY:
        drive(assembly, disk, datagram)
    assert assembly.state is AssemblyState.COMPLETE and bytes(disk) == IMAGE


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["v", "frames", "parity", "x"]), inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(body=json_values | st.binary(max_size=80))
def test_repair_requests_of_any_shape_parse_or_drop_never_raise(body):
    import json as json_module

    from vmcast.protocol import REPAIR_REQUEST_OFFSET, Dropped, RepairRequest, decode_repair_request

    payload = body if isinstance(body, bytes) else json_module.dumps(body).encode()
    datagram = COOKIE + REPAIR_REQUEST_OFFSET.to_bytes(8, "big") + payload
    result = decode_repair_request(datagram, cookie=COOKIE, frame_count=9, block_count=3)
    assert isinstance(result, (RepairRequest, Dropped))
    if isinstance(result, RepairRequest):
        assert all(0 <= entry[0] < 3 and entry[1] >= 1 and len(entry) in (2, 3) for entry in result.parity)
