"""What a receive does with the state an earlier receive left beside the output (`vmcast.receiver.state`).

Running the same ``vmcast receive`` again resumes an interrupted receive: the assembly starts from the
blocks that were verified (and fsynced), the output is written in place (never truncated), and those blocks
are not received again. The rules, as a table (server mode: the lease gives the image's name, SHA-1 and
length; without a server the group and port name the stream and its first metadata the image):

===============================================  ==========================================================
the state beside the output says                 what this receive does
===============================================  ==========================================================
nothing (no file, or one that cannot be used)    a fresh receive; a non-empty file needs ``--force``
another image (name/format, or group/port)       the same: the file is not known to be ours to overwrite
this image, same SHA-1 and length, verified      hashes the output again and, if it matches, is done at
                                                 once; otherwise receives it again (overwriting)
this image, same SHA-1 and length                resumes from the verified blocks
this image name, another SHA-1 or length         says so ("image X changed since the interrupted receive
                                                 (sha1 A → B); starting over") and starts over in place
===============================================  ==========================================================

"Ours to overwrite" is what ``reuse_file`` tells `target.open_target`: a regular file that an earlier
receive of the same image wrote may be written again without ``--force``; block devices get every safety
check whatever the state says.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vmcast.protocol import Checkpoint

from .state import ReceiverState


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumePlan:
    previous: ReceiverState | None
    """The state this plan was made from, when it is about this stream or image."""
    checkpoint: Checkpoint | None = None
    """What the assembly starts from (None: from nothing)."""
    reuse_file: bool = False
    """The output is an earlier receive of this image: write it in place without ``--force``."""
    reverify: bool = False
    """The output was verified before and the image is the same: hash it again instead of receiving it."""
    note: str | None = None
    """What to tell the user about it."""

    def starting_over(self) -> ResumePlan:
        """The plan once a re-verification failed: receive the image again, in place."""
        return replace(self, checkpoint=None, reverify=False, note=None)


FRESH = ResumePlan(previous=None)


def plan_for_lease(state: ReceiverState | None, *, image: str, format: str, sha1: str, length: int, frame_size: int, block_size: int | None, path: str) -> ResumePlan:
    """Server mode: the lease says which image (`image`, `format`) and what it is now (`sha1`, `length`, layout)."""
    if state is None:
        return FRESH
    if (state.image, state.format) != (image, format):
        return ResumePlan(previous=None, note=f"{path}'s state is about image {state.image!r} ({state.format}), not {image!r} ({format}): not resuming")
    sha1 = sha1.lower()
    if (state.sha1, state.length) != (sha1, length):
        change = f"sha1 {state.sha1} → {sha1}" if state.sha1 != sha1 else f"{state.length} → {length} bytes"
        since = "the receive that verified it" if state.verified else "the interrupted receive"
        return ResumePlan(previous=state, reuse_file=True, note=f"image {image} changed since {since} ({change}); starting over")
    if state.verified:
        return ResumePlan(previous=state, reuse_file=True, reverify=True, note=f"{path} already holds image {image}, verified; hashing it again")
    checkpoint = state.checkpoint()
    if checkpoint is None or (checkpoint.frame_size, checkpoint.block_size) != (frame_size, block_size or checkpoint.block_size):
        return ResumePlan(previous=state, reuse_file=True, note=f"the stream of {image} is cut differently from the interrupted receive's; starting over")
    return ResumePlan(previous=state, checkpoint=checkpoint, reuse_file=True)  # the pump says so once it resumed


def plan_for_group(state: ReceiverState | None, *, group: str, port: int, cookie: str, path: str) -> ResumePlan:
    """Without a server: the stream is named by `group`, `port` and `cookie`; its image is known only later."""
    if state is None:
        return FRESH
    if (state.group, state.port) != (group, port):
        return ResumePlan(previous=None, note=f"{path}'s state is about the stream on {state.group}:{state.port}, not {group}:{port}: not resuming")
    if state.verified and state.cookie == cookie.lower():
        # One cookie is one image (docs/PROTOCOL.md section 3): no need to hear the stream to know it.
        return ResumePlan(previous=state, reuse_file=True, reverify=True, note=f"{path} already holds this stream's image, verified; hashing it again")
    # Whether it is the same image is known at the first metadata (`image_changed`); the assembly applies
    # the checkpoint only if SHA-1, length and layout all match.
    return ResumePlan(previous=state, checkpoint=state.checkpoint(), reuse_file=True)


def image_changed(plan: ResumePlan, *, sha1: str, length: int) -> str | None:
    """Without a server, at the stream's first metadata: the message when it is not the image the state is about."""
    previous = plan.previous
    if previous is None or (previous.sha1, previous.length) == (sha1.lower(), length):
        return None
    return f"the image on {previous.group}:{previous.port} changed since the interrupted receive (sha1 {previous.sha1} → {sha1.lower()}); starting over"
