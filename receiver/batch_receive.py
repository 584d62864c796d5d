"""Many datagrams per system call: ``recvmmsg(2)`` into slots laid end to end, so that consecutive frames read
like one coalesced buffer.

Why: on a link whose datagrams the kernel does not coalesce (UDP GRO needs the NIC or veth to hand it a batch,
and a rate-limited link hands over one packet at a time), the pump takes one ``recvmsg`` and one trip through
the assembly per datagram. When it falls behind (shared cores, a parity decode, a read-back), its socket holds
many datagrams; ``recvmmsg`` with ``MSG_WAITFORONE`` returns them all at once, and since slot ``i`` starts
exactly ``i`` frame datagrams into one buffer, a run of full-size frames of one source is laid out as a UDP
GRO buffer would be: `Assembly.receive_run` takes it in one step. The further behind, the larger the batch.

Layout: slot ``i`` is two buffers, scattered into by the kernel in order: ``slot_size`` bytes at
``i * slot_size`` of `view` (the contiguous part), then ``overflow_size`` bytes of its own for whatever
exceeds ``slot_size`` (a metadata frame, a foreign datagram), so no datagram up to ``slot_size +
overflow_size`` bytes is cut: none of UDP/IPv4 (`MAX_DATAGRAM`), so no receive is ever truncated.
`datagram(i)` gives slot ``i``'s datagram whole.

Python's socket module has no ``recvmmsg``; it is called from the C library with ``ctypes`` (standard library,
no compiled code of ours), which releases the GIL for the call. The message headers live in a bytearray the
structures are laid over, so lengths, flags and source ports are read through integer views of it, not
ctypes attribute access (~0.3 µs each).

Error handling: `receive` raises `BlockingIOError` when nothing arrived within the socket's SO_RCVTIMEO,
`InterruptedError` for a signal, `OSError` for anything else; and `OSError` (ENOSYS) from the constructor
where the C library has no ``recvmmsg``.
Resource handling: holds ``slots * (slot_size + overflow_size)`` bytes; the socket stays the caller's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

# A sender's datagrams gathered per call, at most: 64 frames of 1400 bytes is ~90 KB, ~2.5 ms of a 300 Mbit/s
# link; more would only make the rare catch-up after a long pause cheaper still.
SLOTS = 64
# Room past a slot for a datagram longer than a frame (a metadata frame holds a JSON document): any UDP/IPv4
# datagram fits in slot plus overflow.
MAX_DATAGRAM = 65_507
# recvmmsg's flag: wait (up to SO_RCVTIMEO) for the first datagram only, then take what is queued.
MSG_WAITFORONE = 0x10000


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("header", _MsgHdr), ("length", ctypes.c_uint)]


class _SockAddrIn(ctypes.Structure):
    # struct sockaddr_in: the port is bytes 2-3, big-endian.
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_ubyte * 2), ("address", ctypes.c_ubyte * 4), ("zero", ctypes.c_ubyte * 8)]


_NAME_SIZE = ctypes.sizeof(_SockAddrIn)
_HEADER_SIZE = ctypes.sizeof(_MMsgHdr)
# The offset, in unsigned ints, of a message's received length within its header.
_LENGTH_WORD = _MMsgHdr.length.offset // 4


def _recvmmsg() -> ctypes._CFuncPtr:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        function = libc.recvmmsg
    except AttributeError:
        raise OSError(errno.ENOSYS, "the C library has no recvmmsg") from None
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


class DatagramBatch:
    """Receives up to `slots` datagrams of `sock` per call into slots of `slot_size` bytes laid end to end."""

    def __init__(self, sock: socket.socket, *, slot_size: int, slots: int = SLOTS) -> None:
        if not 1 <= slot_size <= MAX_DATAGRAM or slots < 1:
            raise ValueError(f"slots of 1..{MAX_DATAGRAM} bytes, at least one: not {slots} of {slot_size}")
        self.slot_size = slot_size
        self.slots = slots
        self._fd = sock.fileno()
        self._recvmmsg = _recvmmsg()
        overflow_size = MAX_DATAGRAM - slot_size
        self._contiguous = bytearray(slot_size * slots)
        self._overflow = bytearray(max(overflow_size, 1) * slots)
        self._overflow_size = overflow_size
        self.view = memoryview(self._contiguous)
        """The slots' first `slot_size` bytes each, end to end: slot ``i`` at ``i * slot_size``."""
        self._overflow_view = memoryview(self._overflow)
        self._names = bytearray(_NAME_SIZE * slots)
        self._headers = bytearray(_HEADER_SIZE * slots)
        self._words = memoryview(self._headers).cast("I")
        contiguous = ctypes.addressof((ctypes.c_char * len(self._contiguous)).from_buffer(self._contiguous))
        overflow = ctypes.addressof((ctypes.c_char * len(self._overflow)).from_buffer(self._overflow))
        names = ctypes.addressof((ctypes.c_char * len(self._names)).from_buffer(self._names))
        self._iovecs = (_IoVec * (2 * slots))()
        headers = (_MMsgHdr * slots).from_buffer(self._headers)
        for index in range(slots):
            self._iovecs[2 * index] = _IoVec(contiguous + index * slot_size, slot_size)
            self._iovecs[2 * index + 1] = _IoVec(overflow + index * overflow_size, overflow_size)
            header = headers[index].header
            header.name = names + index * _NAME_SIZE
            header.namelen = _NAME_SIZE
            header.iov = ctypes.addressof(self._iovecs) + 2 * index * ctypes.sizeof(_IoVec)
            header.iovlen = 2 if overflow_size else 1
        self._address = ctypes.addressof(headers)
        self._keep = headers  # the ctypes view over _headers: alive as long as we are

    def receive(self) -> int:
        """Wait (up to the socket's SO_RCVTIMEO) for a datagram; then take what else is queued, up to `slots`.
        Returns how many; slots ``0 .. count - 1`` then have `lengths`, `ports` and `datagram`."""
        count = self._recvmmsg(self._fd, self._address, self.slots, MSG_WAITFORONE, None)
        if count < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise BlockingIOError(code, os.strerror(code))
            if code == errno.EINTR:
                raise InterruptedError(code, os.strerror(code))
            raise OSError(code, os.strerror(code))
        return count

    def lengths(self, count: int) -> list[int]:
        """The datagram lengths of slots ``0 .. count - 1`` (one read of the headers for a whole batch)."""
        words = _HEADER_SIZE // 4
        return self._words[_LENGTH_WORD : count * words : words].tolist()

    def ports(self, count: int) -> list[int]:
        """The source ports of slots ``0 .. count - 1``."""
        end = count * _NAME_SIZE
        return [high << 8 | low for high, low in zip(self._names[2:end:_NAME_SIZE], self._names[3:end:_NAME_SIZE], strict=True)]

    def length(self, index: int) -> int:
        """Bytes of slot `index`'s datagram (more than `slot_size` when it ran into the overflow)."""
        return self._words[index * (_HEADER_SIZE // 4) + _LENGTH_WORD]

    def datagram(self, index: int) -> memoryview | bytes:
        """Slot `index`'s datagram, whole: a view into the slot, or a copy joined with its overflow."""
        length = self.length(index)
        start = index * self.slot_size
        if length <= self.slot_size:
            return self.view[start : start + length]
        extra = self._overflow_view[index * self._overflow_size : index * self._overflow_size + length - self.slot_size]
        return bytes(self.view[start : start + self.slot_size]) + bytes(extra)
