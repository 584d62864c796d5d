"""Stand-ins for three small pieces of `vmcast.protocol` API the receiver needs and the protocol does not offer yet.

Everything here reads private state of `Assembly` and `RepairPlanner`; it is
kept in this one module so that it can be deleted in one go once the protocol offers the real thing. Each
function uses the protocol's own method when it exists. Asked of the protocol's owner:

* ``Assembly.is_verified(block) -> bool``: the fallback must not overwrite a block that multicast already
  verified (were the HTTP bytes bad, it would damage a good block).
* ``Assembly.held_frames -> bitarray`` (read-only): what `RepairPlanner(received=...)` wants; today the
  private ``Assembly._received``, as the planner's documentation says.
* ``RepairPlanner.passed_everything -> bool``: a whole loop of the carousel went by since this receiver
  joined (the HTTP end game waits for it).
"""

from __future__ import annotations

from bitarray import bitarray
from vmcast.protocol import Assembly, RepairPlanner


def held_frames(assembly: Assembly) -> bitarray:
    """The assembly's bitarray of held frames, one bit per frame, for `RepairPlanner` (read it, never write)."""
    held = getattr(assembly, "held_frames", None)
    return held if held is not None else assembly._received


def is_verified(assembly: Assembly, block: int) -> bool:
    method = getattr(assembly, "is_verified", None)
    if method is not None:
        return method(block)
    return bool(assembly._verified[block])


def passed_everything(planner: RepairPlanner) -> bool:
    """Whether the carousel went a whole loop since the planner saw its first frame."""
    value = getattr(planner, "passed_everything", None)
    return bool(value if value is not None else planner._passed_everything)
