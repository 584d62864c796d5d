"""How an SDK call comes out as a domain error of its caller (`SourceError`, `RegistrationError`), whatever
the SDK raised.

Each caller decides *which* domain error an SDK exception becomes, with its own ``translate(operation,
error)``. What they share is this policy, applied here once: a domain error raised on the way (one of
``passes``) passes as it is; every other exception is translated and never chained (``raise ... from None``:
the SDK's exception may hold request headers or bodies, which a chained one would carry into tracebacks and
logs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")
_DomainError = TypeVar("_DomainError", bound=Exception)


def translated_call(
    operation: str,
    request: Callable[[], _T],
    translate: Callable[[str, Exception], _DomainError],
    *,
    passes: type[_DomainError],
) -> _T:
    """Run one SDK request; a `passes` it raises passes as it is, every other exception is `translate`d."""
    try:
        return request()
    except passes:
        raise
    except Exception as error:  # noqa: BLE001 - every SDK failure is translated, none passes raw
        raise translate(operation, error) from None


def error_text(error: BaseException) -> str:
    """``Type: message`` of an SDK exception (just ``Type`` when it has no message), not yet redacted."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
