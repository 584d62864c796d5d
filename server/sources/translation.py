"""How a source's SDK calls and body reads come out as `SourceError`s, whatever the SDK raised.

Glance (openstacksdk/keystoneauth) and S3 (botocore) differ in *which* `SourceError` an exception becomes:
each remote has its own ``_translate(operation, error)``. What they share is the policy of
`vmcast.sdk.translation`, applied here with `SourceError` as the error that passes as it is; every other
exception is translated, unchained: in calls, and (`translated_chunks`) in the reads of a response body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from vmcast.sdk import translation as sdk_translation
from vmcast.sdk.translation import error_text

from .errors import SourceError

__all__ = ["Translate", "error_text", "translated_call", "translated_chunks"]

Translate = Callable[[str, Exception], SourceError]
"""``translate(operation, error)``: the `SourceError` that says `operation` failed with `error`."""

_T = TypeVar("_T")


def translated_call(operation: str, request: Callable[[], _T], translate: Translate) -> _T:
    """Run one SDK request; its exceptions come out as `translate`'s `SourceError`s."""
    return sdk_translation.translated_call(operation, request, translate, passes=SourceError)


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
