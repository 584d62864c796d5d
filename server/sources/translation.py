"""How a source's SDK calls and body reads come out as `SourceError`s, whatever the SDK raised.

Glance (openstacksdk/keystoneauth) and S3 (botocore) differ in *which* `SourceError` an exception becomes:
each remote has its own ``_translate(operation, error)``. What they share is the policy of `errors`, applied
here once: a `SourceError` raised on the way passes as it is; every other exception is translated and never
chained (``raise ... from None``: the SDK's exception may hold request headers or bodies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from .errors import SourceError

Translate = Callable[[str, Exception], SourceError]
"""``translate(operation, error)``: the `SourceError` that says `operation` failed with `error`."""

_T = TypeVar("_T")


def translated_call(operation: str, request: Callable[[], _T], translate: Translate) -> _T:
    """Run one SDK request; its exceptions come out as `translate`'s `SourceError`s."""
    try:
        return request()
    except SourceError:
        raise
    except Exception as error:  # noqa: BLE001 - every SDK failure is translated, none passes raw
        raise translate(operation, error) from None


def translated_chunks(stream: Iterator[bytes], operation: str, translate: Translate) -> Iterator[bytes]:
    """The chunks of a response body; an error mid-body (connection reset, timeout) comes out translated.

    Only the reads are guarded: the ``yield`` is outside the ``try``, so an exception thrown into the
    generator (``close()``, ``throw()``) passes untouched.
    """
    while True:
        try:
            chunk = next(stream)
        except StopIteration:
            return
        except Exception as error:  # noqa: BLE001 - the SDK's errors mid-body, translated
            raise translate(operation, error) from None
        yield chunk


def error_text(error: BaseException) -> str:
    """``Type: message`` of an SDK exception (just ``Type`` when it has no message), not yet redacted."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
