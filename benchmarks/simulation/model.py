"""One scenario of the scale model: the real sans-IO sender and receivers on a simulated lossy link.

What is real and what is modelled:

* The sender is `vmcast.protocol.Carousel` (with its `RepairQueue`), asked `next_send(now)` whenever its
  link is free. Each datagram occupies the link for ``(payload + 16 + 28) * 8 / link_rate`` seconds (vmcast
  header, IPv4 and UDP headers; vmcast's `--rate` counts the same bytes).
* Every receiver is a real `Assembly` fed the real datagram bytes it did not lose, and a real
  `RepairPlanner` that observes the carousel frames it received (`SendData.repair` tells a repair frame, as
  the source port would) and is polled on its own timer with ``jitter=rng.random()``. Its requests reach
  `Carousel.request_repair` after `request_delay` seconds, unless lost on the way.
* Receivers store no bytes: they model a receiver whose writes are correct. `check_block` gets the true bytes
  of the block (shared, from the one image) and `check_image` the image's true SHA-1, so an assembly reaches
  COMPLETE exactly when it holds every frame.
* Repair is per-frame NACK (`Scenario.fec` False: the planner asks for frames) or parity (`Scenario.fec`
  True: the planner asks per block for a number of RaptorQ symbols, `fec=True`). Parity datagrams carry real
  RaptorQ symbols of the image's blocks (`Image.parity_datagram`, made once per block and ESI), fed to the
  real assemblies; when one says a block is decodable, `recover_block` gets the block's true bytes (what a
  receiver whose writes are correct reads back: its held frames are right, the rest is never looked at) and
  really decodes it; the frames it returns are compared with the image, then `check_block` as for any block.
  RaptorQ decoding costs ~4 ms per 1 MiB block, so 10,000 receivers spend ~2 CPU minutes decoding;
  ``decode="count"`` (`simulate(decode=...)`, `--fec-decode count`) instead counts a decodable block as
  recovered without decoding (`Assembly.accept_block` with the true bytes): the ~1% of decodes from exactly K
  symbols that need one more symbol then never happen. The smoke test runs both and checks they agree.
* Loss is per receiver and per datagram (data, repair and metadata datagrams alike): independent (Bernoulli)
  or bursty (Gilbert: a receiver in its bad state loses everything, bursts and gaps geometric). Repair
  requests on the way back are lost independently at the receiver's mean loss rate.
* The model is drawn event by event, not receiver by receiver: each receiver's next loss is scheduled by a
  geometric draw, so a datagram costs nothing for the receivers that lose it, and completed receivers leave
  the lists. A datagram a receiver already holds is not fed to it unless `feed_duplicates` (the assembly
  would only count it as a duplicate; the results are identical either way, the smoke test checks that).

One private attribute is read (no public API for it yet, reported to the protocol's owner):
``RepairPlanner._next_request_at``, when a poll can next return something, to schedule polls exactly rather
than polling 10,000 planners every millisecond. The design experiments (`VARIANTS`) subclass `RepairQueue`
and set ``Carousel._repairs_in_a_row``; they are not the protocol.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from vmcast.protocol import (
    Assembly,
    AssemblyState,
    BlockRecovered,
    Carousel,
    DataReceived,
    Idle,
    ImageVerified,
    Manifest,
    MetadataReceived,
    ParityEncoder,
    ParityReceived,
    RepairPlanner,
    RepairQueue,
    RepairRequest,
    SendData,
    SendMetadata,
    SendParity,
    encode_parity_header,
    manifest_of,
)
from vmcast.protocol import assembly as assembly_module
from vmcast.protocol import carousel as carousel_module
from vmcast.protocol import repair as repair_module

COOKIE = b"vmcsim\x00\x01"
HEADER_BYTES = 16
IP_UDP_BYTES = 28

# Constants a run may override, and the module that reads each. REQUEST_INTERVAL and REREQUEST_AFTER are
# also `RepairPlanner` arguments and METADATA_INTERVAL a `Carousel` argument: they are passed explicitly.
TUNABLES = {
    "REQUEST_INTERVAL": repair_module,
    "REQUEST_JITTER": repair_module,
    "REORDER_MARGIN": repair_module,
    "REREQUEST_AFTER": repair_module,
    "MAX_RANGES_PER_REQUEST": repair_module,
    "MAX_REPAIRS_IN_A_ROW": carousel_module,
    "METADATA_INTERVAL": carousel_module,
    "PARITY_SPARE": assembly_module,
}


@contextlib.contextmanager
def overridden(overrides: dict[str, float]) -> Iterator[dict[str, float]]:
    """Set protocol constants for the duration of a run (in this process only); yields every effective value."""
    saved = {}
    try:
        for name, value in overrides.items():
            if name not in TUNABLES:
                raise ValueError(f"unknown constant {name}; tunable: {', '.join(TUNABLES)}")
            module = TUNABLES[name]
            saved[name] = getattr(module, name)
            setattr(module, name, type(saved[name])(value))
        yield {name: getattr(module, name) for name, module in TUNABLES.items()}
    finally:
        for name, value in saved.items():
            setattr(TUNABLES[name], name, value)


# -- loss --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossModel:
    """Per-receiver datagram loss: mean `rate`; `burst` is the mean burst length (1: independent losses)."""

    rate: float = 0.0
    burst: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0 or self.burst < 1.0:
            raise ValueError(f"bad loss model {self}")

    @classmethod
    def parse(cls, text: str) -> LossModel:
        """``none``, ``1%``, ``0.05`` (independent), or ``ge:1%:20`` (Gilbert: mean 1%, bursts of 20 on average)."""
        def rate(value: str) -> float:
            return float(value[:-1]) / 100 if value.endswith("%") else float(value)

        if text in ("none", "0"):
            return cls()
        if text.startswith("ge:"):
            _, mean, burst = text.split(":")
            return cls(rate=rate(mean), burst=float(burst))
        return cls(rate=rate(text))

    @property
    def label(self) -> str:
        if self.rate == 0:
            return "none"
        if self.burst == 1:
            return f"{self.rate:.0%} indep"
        return f"{self.rate:.0%} burst {self.burst:g}"

    @property
    def spec(self) -> str:
        if self.rate == 0:
            return "none"
        return f"{self.rate:g}" if self.burst == 1 else f"ge:{self.rate:g}:{self.burst:g}"

    def process(self, rng: random.Random) -> LossProcess:
        if self.rate == 0:
            return LossProcess(rng)
        if self.burst == 1:
            return BernoulliLoss(rng, self.rate)
        return GilbertLoss(rng, self.rate, self.burst)


_NOBODY: frozenset[int] = frozenset()


class LossProcess:
    """No loss. Subclasses schedule each receiver's next change by datagram index, so cost is per loss event."""

    rate = 0.0

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._events: dict[int, list[int]] = {}
        self._alive: set[int] = set()

    def join(self, receiver: int, datagram: int) -> None:
        """`receiver` listens from datagram index `datagram` on."""

    def leave(self, receiver: int) -> None:
        self._alive.discard(receiver)

    def losers(self, datagram: int) -> set[int] | frozenset[int]:
        """The receivers that lose datagram number `datagram` (called once per datagram, in order)."""
        return _NOBODY

    def uplink_lost(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate

    def _at(self, datagram: int, receiver: int) -> None:
        events = self._events.get(datagram)
        if events is None:
            self._events[datagram] = [receiver]
        else:
            events.append(receiver)

    def _geometric(self, log_keep: float) -> int:
        """Trials until the first success (>= 1), success probability ``1 - exp(log_keep)``."""
        return int(math.log(1.0 - self.rng.random()) / log_keep) + 1


class BernoulliLoss(LossProcess):
    def __init__(self, rng: random.Random, rate: float) -> None:
        super().__init__(rng)
        self.rate = rate
        self._log_keep = math.log1p(-rate)

    def join(self, receiver: int, datagram: int) -> None:
        self._alive.add(receiver)
        self._at(datagram + self._geometric(self._log_keep) - 1, receiver)

    def losers(self, datagram: int) -> set[int] | frozenset[int]:
        events = self._events.pop(datagram, None)
        if not events:
            return _NOBODY
        alive = self._alive
        for receiver in events:
            if receiver in alive:
                self._at(datagram + self._geometric(self._log_keep), receiver)
        return set(events)


class GilbertLoss(LossProcess):
    """Two states: good (no loss) and bad (every datagram lost); bursts of mean `burst`, mean loss `rate`."""

    def __init__(self, rng: random.Random, rate: float, burst: float) -> None:
        super().__init__(rng)
        self.rate = rate
        gap = burst * (1 - rate) / rate
        self._log_stay_bad = math.log1p(-1 / burst)
        self._log_stay_good = math.log1p(-1 / gap)
        self._bad: set[int] = set()

    def join(self, receiver: int, datagram: int) -> None:
        self._alive.add(receiver)
        if self.rng.random() < self.rate:  # the stationary distribution; runs are memoryless
            self._bad.add(receiver)
            self._at(datagram + self._geometric(self._log_stay_bad), receiver)
        else:
            self._at(datagram + self._geometric(self._log_stay_good) - 1, receiver)

    def leave(self, receiver: int) -> None:
        self._alive.discard(receiver)
        self._bad.discard(receiver)

    def losers(self, datagram: int) -> set[int] | frozenset[int]:
        events = self._events.pop(datagram, None)
        if events:
            bad, alive = self._bad, self._alive
            for receiver in events:
                if receiver not in alive:
                    continue
                if receiver in bad:
                    bad.discard(receiver)
                    self._at(datagram + self._geometric(self._log_stay_good), receiver)
                else:
                    bad.add(receiver)
                    self._at(datagram + self._geometric(self._log_stay_bad), receiver)
        return self._bad


# -- design experiments (not the protocol) -------------------------------------------------------------------

VARIANTS = {
    "queue": "'oldest': the sender serves the oldest pending request first, not in frame order from a cursor",
    "share": "C: after each repair at least C carousel frames (the protocol: 1 with MAX_REPAIRS_IN_A_ROW=1)",
    "holdoff": "S: the sender ignores requests for frames it sent (repair or carousel) in the last S seconds: they may "
               "have been asked for before that frame arrived (NORM's repair hold-off)",
}


class OldestFirstQueue(RepairQueue):
    """`RepairQueue` that pops frames in the order they were first requested (a starvation-free variant)."""

    def __init__(self, *, layout, fec: bool = False) -> None:
        super().__init__(layout=layout, fec=fec)
        self._order: deque[int] = deque()

    def add(self, request) -> None:
        pending = self._pending
        for first, count in request.ranges:
            for frame in range(first, first + count):
                if not pending[frame]:
                    self._order.append(frame)
        super().add(request)

    def pop(self) -> int | None:
        pending = self._pending
        while self._order:
            frame = self._order.popleft()
            if pending[frame]:
                pending[frame] = 0
                self._pending_count -= 1
                return frame
        return None


def check_variant(variant: dict[str, object]) -> dict[str, object]:
    for name, value in variant.items():
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name}; known: {', '.join(VARIANTS)}")
        if name == "queue" and value not in ("oldest", "frame-order"):
            raise ValueError("queue=oldest or queue=frame-order")
        if name == "share" and (not isinstance(value, int) or value < 0):
            raise ValueError("share takes a whole number")
        if name == "holdoff" and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError("holdoff takes seconds")
    return variant


def _without_recent(request: RepairRequest, last_sent: list[float], since: float) -> RepairRequest | None:
    """The request without the frames sent at or after `since`."""
    ranges = []
    for first, count in request.ranges:
        start = None
        for frame in range(first, first + count):
            if last_sent[frame] < since:
                if start is None:
                    start = frame
            elif start is not None:
                ranges.append((start, frame - start))
                start = None
        if start is not None:
            ranges.append((start, first + count - start))
    return RepairRequest(ranges=tuple(ranges), parity=request.parity) if ranges or request.parity else None


# -- the image ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """The one image every receiver takes, with every frame's datagram built once."""

    manifest: Manifest
    datagrams: tuple[bytes, ...]
    block_bytes: tuple[bytes, ...]
    frame_bits: tuple[int, ...] = field(repr=False)
    """Bits on the wire per frame's datagram (vmcast header, IPv4 and UDP included)."""
    _parity: dict[tuple[int, int], bytes] = field(default_factory=dict, repr=False, compare=False)
    _encoders: dict[int, ParityEncoder] = field(default_factory=dict, repr=False, compare=False)

    def parity_datagram(self, block: int, esi: int) -> bytes:
        """The parity frame of `block`, symbol `esi`: real RaptorQ bytes, made on first use and kept."""
        datagram = self._parity.get((block, esi))
        if datagram is None:
            encoder = self._encoders.get(block)
            if encoder is None:
                encoder = self._encoders[block] = ParityEncoder(self.block_bytes[block], frame_size=self.frame_size)
            # Symbols in chunks: the carousel asks for each block's ESIs in increasing order.
            for offset, symbol in enumerate(encoder.symbols(esi, 32 if esi + 32 < (1 << 24) else 1)):
                self._parity[(block, esi + offset)] = encode_parity_header(COOKIE, block=block, esi=esi + offset) + symbol
            datagram = self._parity[(block, esi)]
        return datagram

    @property
    def frames(self) -> int:
        return self.manifest.layout.frame_count

    @property
    def frame_size(self) -> int:
        return self.manifest.layout.frame_size

    @property
    def loop_bits(self) -> int:
        return sum(self.frame_bits)

    @classmethod
    def random(cls, *, frames: int, frame_size: int = 1400, seed: int = 0) -> Image:
        rng, size, chunk = random.Random(f"image/{seed}"), frames * frame_size, 1 << 26
        data = b"".join(rng.randbytes(min(chunk, size - at)) for at in range(0, size, chunk))
        manifest = manifest_of(data, name="simulated.raw", frame_size=frame_size)
        layout = manifest.layout
        datagrams = tuple(COOKIE + (k * frame_size).to_bytes(8, "big") + data[k * frame_size : (k + 1) * frame_size] for k in range(frames))
        blocks = tuple(data[slice(*layout.block_span(b))] for b in range(layout.block_count))
        bits = tuple((len(d) + IP_UDP_BYTES) * 8 for d in datagrams)
        return cls(manifest=manifest, datagrams=datagrams, block_bytes=blocks, frame_bits=bits)


# -- scenarios and results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    receivers: int
    loss: LossModel = LossModel()
    join_spread: float = 0.0
    """Receivers join uniformly over this many loops from the start (0: all at time 0)."""
    repair: bool = True
    """False: receivers never ask (the carousel alone)."""
    fec: bool = False
    """True: receivers ask for parity per block (the stream announces RaptorQ); False: per-frame NACK."""

    @property
    def name(self) -> str:
        parts = [f"N={self.receivers}", self.loss.label]
        if self.join_spread:
            parts.append(f"late {self.join_spread:g} loop")
        if not self.repair:
            parts.append("no repair")
        else:
            parts.append("fec" if self.fec else "nack")
        return ", ".join(parts)


@dataclass
class Result:
    scenario: Scenario
    frames: int
    frame_size: int
    link_rate: float
    loop_seconds: float
    seed: int
    constants: dict[str, float]
    completion_loops: list[float]
    """Per receiver, from its join to COMPLETE, in loops (inf: not complete when the run stopped)."""
    repair_frames: int
    """Repair datagrams sent: requested data frames plus parity frames."""
    parity_frames: int
    """Of which parity frames."""
    carousel_frames: int
    metadata_datagrams: int
    requests_sent: int
    requests_lost: int
    frames_requested: int
    parity_requested: int
    repairs_nobody_needed: int
    simulated_seconds: float
    wall_seconds: float
    image_checks_ok: int
    cpu_seconds: float = 0.0
    decodes: int = 0
    """Blocks recovered from parity (real RaptorQ decodes, unless `decode_mode` is "count")."""
    failed_decodes: int = 0
    """Decodes that needed one more symbol (`RecoveryFailed`)."""
    decode_mode: str = "real"
    variant: dict[str, object] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    """How many assemblies ended in each `AssemblyState`."""

    def percentile(self, q: float) -> float:
        ordered = sorted(self.completion_loops)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    @property
    def incomplete(self) -> int:
        return sum(1 for c in self.completion_loops if c == math.inf)

    @property
    def datagrams(self) -> int:
        return self.repair_frames + self.carousel_frames + self.metadata_datagrams

    def summary(self) -> dict[str, object]:
        n = self.scenario.receivers
        return {
            "scenario": self.scenario.name,
            "receivers": n,
            "loss": self.scenario.loss.spec,
            "loss_label": self.scenario.loss.label,
            "join_spread_loops": self.scenario.join_spread,
            "repair": self.scenario.repair,
            "fec": self.scenario.fec,
            "frames": self.frames,
            "frame_size": self.frame_size,
            "link_rate_bps": self.link_rate,
            "loop_seconds": self.loop_seconds,
            "seed": self.seed,
            "constants": self.constants,
            "p50": self.percentile(0.50),
            "p99": self.percentile(0.99),
            "max": self.percentile(1.0),
            "incomplete": self.incomplete,
            "repair_fraction": self.repair_frames / self.frames,
            "parity_fraction": self.parity_frames / self.frames,
            "useless_repair_fraction": self.repairs_nobody_needed / self.frames,
            "requests_per_receiver": self.requests_sent / n,
            "requests_lost": self.requests_lost,
            "frames_requested_per_receiver": self.frames_requested / n,
            "parity_requested_per_receiver": self.parity_requested / n,
            "decodes": self.decodes,
            "failed_decodes": self.failed_decodes,
            "decode_mode": self.decode_mode,
            "carousel_loops": self.carousel_frames / self.frames,
            "wire_per_image": self.datagrams / self.frames,
            "metadata_datagrams": self.metadata_datagrams,
            "simulated_seconds": self.simulated_seconds,
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "variant": self.variant,
            "states": self.states,
            "verified_images": self.image_checks_ok,
        }


# -- the run -------------------------------------------------------------------------------------------------


def simulate(
    scenario: Scenario,
    image: Image,
    *,
    link_rate: float,
    seed: int = 1,
    request_delay: float = 0.001,
    overrides: dict[str, float] | None = None,
    feed_duplicates: bool = False,
    max_loops: float = 40.0,
    variant: dict[str, object] | None = None,
    decode: str = "real",
) -> Result:
    """Run one scenario until every receiver is COMPLETE (or `max_loops` loops after the last join).

    `overrides` sets protocol constants (`TUNABLES`); `variant` turns on design experiments (`VARIANTS`).
    `decode`: "real" decodes every block recovered from parity; "count" counts it recovered (module docstring).
    """
    if decode not in ("real", "count"):
        raise ValueError(f"decode is 'real' or 'count', not {decode!r}")
    with overridden(overrides or {}) as constants:
        return _Run(scenario, image, link_rate=link_rate, seed=seed, request_delay=request_delay, constants=constants,
                    feed_duplicates=feed_duplicates, max_loops=max_loops, variant=check_variant(dict(variant or {})),
                    decode=decode).run()


class _Run:
    def __init__(self, scenario: Scenario, image: Image, *, link_rate: float, seed: int, request_delay: float,
                 constants: dict[str, float], feed_duplicates: bool, max_loops: float, variant: dict[str, object],
                 decode: str = "real") -> None:
        self.scenario, self.image, self.link_rate, self.seed, self.variant = scenario, image, link_rate, seed, variant
        self.decode = decode
        self.decodes = self.failed_decodes = 0
        self.request_delay, self.constants, self.feed_duplicates = request_delay, constants, feed_duplicates
        key = f"{seed}/{scenario.receivers}/{scenario.loss.spec}/{scenario.join_spread}"
        self.loss = scenario.loss.process(random.Random(f"loss/{key}"))
        self.jitter = random.Random(f"jitter/{key}").random
        join_rng = random.Random(f"join/{key}")
        self.loop_seconds = image.loop_bits / link_rate
        n = scenario.receivers
        self.joins = sorted(
            (join_rng.uniform(0, scenario.join_spread * self.loop_seconds) if scenario.join_spread else 0.0, r) for r in range(n)
        )
        self.deadline = max_loops * self.loop_seconds + (self.joins[-1][0] if n else 0.0)
        self.assemblies = [Assembly(cookie=COOKIE) for _ in range(n)]
        self.planners: list[RepairPlanner | None] = [None] * n
        self.join_time = [0.0] * n
        self.done_time = [math.inf] * n
        self.verified = 0

    def run(self) -> Result:
        started, cpu_started = time.perf_counter(), time.process_time()
        scenario, image, loss = self.scenario, self.image, self.loss
        n = scenario.receivers
        carousel = Carousel(manifest=image.manifest, cookie=COOKIE, metadata_interval=self.constants["METADATA_INTERVAL"])
        if self.variant.get("queue") == "oldest":
            carousel.repairs = OldestFirstQueue(layout=image.manifest.layout, fec=carousel.fec)
        carousel_per_repair = int(self.variant.get("share", 0))  # 0: the carousel's own rule
        since_repair = carousel_per_repair
        holdoff = float(self.variant.get("holdoff", 0.0))
        last_sent = [-math.inf] * image.frames if holdoff else None
        seconds_per_frame = [bits / self.link_rate for bits in image.frame_bits]
        seconds_per_parity = (image.frame_size + HEADER_BYTES + IP_UDP_BYTES) * 8 / self.link_rate
        seconds_per_metadata = [(len(d) + IP_UDP_BYTES) * 8 / self.link_rate for d in carousel.metadata_datagrams]
        datagrams, frame_size, sha1 = image.datagrams, image.frame_size, image.manifest.sha1
        assemblies, planners = self.assemblies, self.planners
        jitter, delay = self.jitter, self.request_delay
        feed_duplicates = self.feed_duplicates
        poll_retry = max(0.001, self.constants["REQUEST_INTERVAL"] / 10)

        waiting: list[int] = []  # joined, no layout yet (no metadata): they drop data
        active: list[tuple[int, object, object, object]] = []  # (r, receive_datagram, observe_carousel, held bits)
        polls: list[tuple[float, int]] = []
        arrivals: deque = deque()
        joins, next_join = self.joins, 0
        remaining = n
        now, d = 0.0, 0
        metadata_datagrams = requests_sent = requests_lost = useless = 0

        def retire(finished: list[int], active: list) -> list:
            """Receivers that completed stop listening: what is left of `active`."""
            for r in finished:
                loss.leave(r)
            gone = set(finished)
            return [entry for entry in active if entry[0] not in gone]

        def complete_block(r: int, block: int, at: float) -> bool:
            assembly = assemblies[r]
            verdict = assembly.check_block(block, image.block_bytes[block])
            if not verdict.image_complete:
                return False
            if not isinstance(assembly.check_image(sha1), ImageVerified) or assembly.state is not AssemblyState.COMPLETE:
                raise AssertionError(f"receiver {r} did not verify")
            self.verified += 1
            self.done_time[r] = at
            return True

        def recover(r: int, block: int, at: float) -> bool:
            """A block the assembly says is decodable: decode it from its held frames and parity, then check it."""
            assembly = assemblies[r]
            if self.decode == "count":
                self.decodes += 1
                verdict = assembly.accept_block(block, image.block_bytes[block])
                if not verdict.image_complete:
                    return False
                return complete_block(r, block, at)
            true_bytes = image.block_bytes[block]
            result = assembly.recover_block(block, true_bytes)
            if result.__class__ is not BlockRecovered:
                self.failed_decodes += 1
                return False
            self.decodes += 1
            start = image.manifest.layout.block_span(block)[0]
            for offset, data in result.frames:
                if data != true_bytes[offset - start : offset - start + len(data)]:
                    raise AssertionError(f"receiver {r}: block {block} decoded to wrong bytes at {offset}")
            return result.checksum_known and complete_block(r, block, at)

        while remaining:
            while next_join < n and joins[next_join][0] <= now:
                r = joins[next_join][1]
                self.join_time[r] = now
                waiting.append(r)
                loss.join(r, d)
                next_join += 1
            while arrivals and arrivals[0][0] <= now:
                request = arrivals.popleft()[1]
                if holdoff:
                    request = _without_recent(request, last_sent, now - holdoff)
                if request is not None:
                    carousel.request_repair(request, now)
            while polls and polls[0][0] <= now:
                _, r = heapq.heappop(polls)
                if self.done_time[r] != math.inf:
                    continue
                planner = planners[r]
                request = planner.poll(now, jitter=jitter())
                if request is not None:
                    requests_sent += 1
                    if loss.uplink_lost():
                        requests_lost += 1
                    else:
                        arrivals.append((now + delay, request))
                due = planner._next_request_at
                heapq.heappush(polls, (due if due is not None and due > now else now + poll_retry, r))
            if now > self.deadline:
                break
            if since_repair < carousel_per_repair:
                carousel._repairs_in_a_row = carousel_module.MAX_REPAIRS_IN_A_ROW  # force a carousel frame
            action = carousel.next_send(now)
            if type(action) is SendData:
                since_repair = 0 if action.repair else since_repair + 1
                frame = action.offset // frame_size
                if holdoff:
                    last_sent[frame] = now
                datagram = datagrams[frame]
                now += seconds_per_frame[frame]
                lost = loss.losers(d)
                d += 1
                for r in waiting:
                    if r not in lost:
                        assemblies[r].receive_datagram(datagram)  # dropped: before metadata
                finished = None
                if action.repair:
                    needed = False
                    for r, receive, _, held in active:
                        if (held[frame] and not feed_duplicates) or r in lost:
                            continue
                        event = receive(datagram)
                        if event.__class__ is DataReceived:
                            needed = True
                            if (event.completed_block is not None and complete_block(r, event.completed_block, now)) or (
                                    event.decodable_block is not None and recover(r, event.decodable_block, now)):
                                finished = finished or []
                                finished.append(r)
                    if not needed:
                        useless += 1
                else:
                    for r, receive, observe, held in active:
                        if r in lost:
                            continue
                        observe(frame)
                        if held[frame] and not feed_duplicates:
                            continue
                        event = receive(datagram)
                        if event.__class__ is DataReceived and (
                                (event.completed_block is not None and complete_block(r, event.completed_block, now))
                                or (event.decodable_block is not None and recover(r, event.decodable_block, now))):
                            finished = finished or []
                            finished.append(r)
                if finished:
                    remaining -= len(finished)
                    active = retire(finished, active)
            elif type(action) is SendParity:
                since_repair = 0
                datagram = image.parity_datagram(action.block, action.esi)
                now += seconds_per_parity
                lost = loss.losers(d)
                d += 1
                for r in waiting:
                    if r not in lost:
                        assemblies[r].receive_datagram(datagram)  # dropped: before metadata
                needed = False
                finished = None
                block = action.block
                for r, receive, _, held in active:
                    if r in lost:
                        continue
                    event = receive(datagram)
                    if event.__class__ is ParityReceived:
                        needed = True
                        if event.decodable and recover(r, block, now):
                            finished = finished or []
                            finished.append(r)
                if not needed:
                    useless += 1
                if finished:
                    remaining -= len(finished)
                    active = retire(finished, active)
            elif type(action) is SendMetadata:
                for index, datagram in enumerate(action.datagrams):
                    now += seconds_per_metadata[index]
                    metadata_datagrams += 1
                    lost = loss.losers(d)
                    d += 1
                    finished = None
                    for r, *_ in active:
                        if r in lost:
                            continue
                        event = assemblies[r].receive_datagram(datagram)
                        # Checksums that arrive after their block's frames: the block is checked now.
                        for block in getattr(event, "blocks_to_check", ()):
                            if complete_block(r, block, now):
                                finished = finished or []
                                finished.append(r)
                    if finished:
                        remaining -= len(finished)
                        active = retire(finished, active)
                    promoted = []
                    for r in waiting:
                        if r in lost:
                            continue
                        event = assemblies[r].receive_datagram(datagram)
                        if isinstance(event, MetadataReceived) and assemblies[r].layout is not None:
                            promoted.append(r)
                            if event.blocks_to_check or assemblies[r].state is not AssemblyState.RECEIVING:
                                raise AssertionError("the model's images have data in every block (no zero blocks)")
                    if promoted:
                        moved = set(promoted)
                        waiting = [r for r in waiting if r not in moved]
                        for r in promoted:
                            assembly = assemblies[r]
                            held = assembly.held_frames
                            planner = RepairPlanner(layout=assembly.layout, received=held,
                                                    interval=self.constants["REQUEST_INTERVAL"],
                                                    rerequest_after=self.constants["REREQUEST_AFTER"],
                                                    parity_held=assembly.parity_held, fec=scenario.fec and assembly.fec,
                                                    parity_seen=assembly.parity_seen)
                            planners[r] = planner
                            active.append((r, assembly.receive_datagram, planner.observe_carousel, held))
                            if scenario.repair:
                                heapq.heappush(polls, (now, r))
            elif type(action) is Idle:
                now = max(now, action.until)
            else:
                raise AssertionError(f"unexpected action {action!r}")

        loops = [
            (self.done_time[r] - self.join_time[r]) / self.loop_seconds if self.done_time[r] != math.inf else math.inf for r in range(n)
        ]
        planned = [p for p in planners if p is not None]
        states: dict[str, int] = {}
        for assembly in assemblies:
            states[assembly.state.value] = states.get(assembly.state.value, 0) + 1
        return Result(
            scenario=scenario,
            frames=image.frames,
            frame_size=image.frame_size,
            link_rate=self.link_rate,
            loop_seconds=self.loop_seconds,
            seed=self.seed,
            constants=dict(self.constants),
            completion_loops=loops,
            repair_frames=carousel.repair_frames_sent + carousel.parity_frames_sent,
            parity_frames=carousel.parity_frames_sent,
            carousel_frames=carousel.data_frames_sent,
            metadata_datagrams=metadata_datagrams,
            requests_sent=requests_sent,
            requests_lost=requests_lost,
            frames_requested=sum(p.frames_requested for p in planned),
            parity_requested=sum(p.parity_requested for p in planned),
            repairs_nobody_needed=useless,
            simulated_seconds=now,
            wall_seconds=time.perf_counter() - started,
            cpu_seconds=time.process_time() - cpu_started,
            variant=dict(self.variant),
            image_checks_ok=self.verified,
            states=states,
            decodes=self.decodes,
            failed_decodes=self.failed_decodes,
            decode_mode=self.decode,
        )
