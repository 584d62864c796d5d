"""Counting model: how much the sender must resend, per-frame NACK repair versus per-block parity (FEC).

No coding is done, only counting. For `receivers` receivers that each see one pass of the image's frames
through the same loss model as the protocol simulation (`model.LossModel`), cut into FEC blocks of `k`
frames:

* **NACK union** (``nack_union``): frames lost by at least one receiver, over the image's frames: what
  per-frame repair must resend at least, since a frame is resent once for everyone who lost it.
* **NACK with re-loss** (``nack``): plus retransmissions of repairs lost again: a frame lost by ``c``
  receivers is sent until each of them has it (retransmissions far apart in time, so lost independently
  at the mean loss rate, bursts or not).
* **FEC max** (``fec_max``): per block, the most frames any one receiver lost in it; a receiver missing
  ``m <= n`` frames of a block decodes it from any ``m`` of ``n`` parity frames (an MDS code such as
  Reed-Solomon, or nearly so for RaptorQ), so the sender sends ``max_r m_r`` parity frames per block.
* **FEC with re-loss** (``fec``): parity frames sent (on each receiver's own loss process, bursts included)
  until every receiver has collected the number it needs in every block: a block's parity back to back, or
  with `interleave` in rounds of one parity frame per block still short.

Blocks are `k` consecutive frames, or with `interleave` every `blocks`-th frame (block ``b`` holds frames
``b, b + blocks, b + 2 * blocks, ...`` of a pass of ``k * blocks`` frames), which spreads a burst of losses
over many blocks.

Fractions are of the image's frames; the protocol simulation's measured repair fraction is comparable with
``nack``. Needs numpy (not a vmcast dependency); the caller reports the model as unavailable without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import LossModel


@dataclass(frozen=True)
class FecResult:
    receivers: int
    loss: LossModel
    k: int
    blocks: int
    nack_union: float
    nack: float
    fec_max: float
    fec: float
    max_lost_in_a_block: int
    interleave: bool = False

    def summary(self) -> dict[str, object]:
        return {
            "model": "fec",
            "receivers": self.receivers,
            "loss": self.loss.spec,
            "loss_label": self.loss.label,
            "fec_block_frames": self.k,
            "interleaved": self.interleave,
            "blocks": self.blocks,
            "nack_union_fraction": self.nack_union,
            "nack_fraction": self.nack,
            "fec_max_fraction": self.fec_max,
            "fec_fraction": self.fec,
            "max_lost_in_a_block": self.max_lost_in_a_block,
        }


def available() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def count(*, receivers: int, loss: LossModel, k: int, blocks: int, interleave: bool = False, seed: int = 1) -> FecResult:
    """Average over `blocks` blocks of `k` frames (the fractions do not depend on the image's length)."""
    import numpy as np

    rng = np.random.default_rng([seed, receivers, k, int(loss.rate * 1e6), int(loss.burst * 1000)])
    p, n = loss.rate, receivers
    if p == 0:
        return FecResult(receivers=n, loss=loss, k=k, blocks=blocks, nack_union=0.0, nack=0.0, fec_max=0.0, fec=0.0,
                         max_lost_in_a_block=0, interleave=interleave)
    bursty = loss.burst > 1
    stay_bad = 1 - 1 / loss.burst
    enter_bad = 1 / (loss.burst * (1 - p) / p) if bursty else p
    bad = rng.random(n) < p  # the stationary state

    def step(bad: np.ndarray) -> np.ndarray:
        """Each receiver's state for the next datagram (independent loss: a fresh draw every time)."""
        draw = rng.random(n)
        if not bursty:
            return draw < p
        return np.where(bad, draw < stay_bad, draw < enter_bad)

    # One pass over the image: frame f of the pass is row f; then cut into blocks, consecutive or interleaved.
    passed = np.empty((k * blocks, n), dtype=bool)
    for frame in range(k * blocks):
        bad = step(bad)
        passed[frame] = bad
    cut = passed.reshape(k, blocks, n).transpose(1, 0, 2) if interleave else passed.reshape(blocks, k, n)
    union = resent = fec_max = fec = 0
    worst = 0
    needs = []
    for lost in cut:
        losers_per_frame = lost.sum(axis=1)
        union += int((losers_per_frame > 0).sum())
        # A frame lost by c receivers is sent until all c have it: the max of c geometric draws, by inversion
        # of P(max <= t) = (1 - p**t) ** c.
        c = losers_per_frame[losers_per_frame > 0]
        u = rng.random(len(c))
        resent += int(np.ceil(np.log1p(-u ** (1.0 / c)) / np.log(p)).clip(min=1).sum())
        need = lost.sum(axis=0)  # frames each receiver lacks in this block
        needs.append(need)
        most = int(need.max())
        worst = max(worst, most)
        fec_max += most
    if interleave:
        # Parity in rounds, one frame for each block some receiver still needs parity of, so that a burst
        # hits the parity of many blocks once rather than one block's parity many times.
        got = np.zeros((blocks, n), dtype=np.int64)
        need = np.stack(needs)
        while True:
            short = np.flatnonzero((got < need).any(axis=1))
            if not len(short):
                break
            for b in short:
                bad = step(bad)
                got[b] += ~bad
                fec += 1
    else:
        for need in needs:  # parity of each block back to back until every receiver has what it needs
            got = np.zeros(n, dtype=np.int64)
            while (got < need).any():
                bad = step(bad)
                got += ~bad
                fec += 1
    frames = k * blocks
    return FecResult(receivers=n, loss=loss, k=k, blocks=blocks, nack_union=union / frames, nack=resent / frames,
                     fec_max=fec_max / frames, fec=fec / frames, max_lost_in_a_block=worst,
                     interleave=interleave)
