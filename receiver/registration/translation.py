"""How an SDK call of a registration comes out as a `RegistrationError`, whatever the SDK raised.

Glance (openstacksdk/keystoneauth) and EC2 (botocore) differ in *which* `RegistrationError` an exception
becomes: each has its own ``translate(operation, error)``. What they share is the policy of `errors`, applied
here once: a `RegistrationError` raised on the way passes as it is; every other exception is translated and
never chained (``raise ... from None``: the SDK's exception may hold request headers or bodies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .errors import RegistrationError

Translate = Callable[[str, Exception], RegistrationError]
"""``translate(operation, error)``: the `RegistrationError` that says `operation` failed with `error`."""

_T = TypeVar("_T")


def translated_call(operation: str, request: Callable[[], _T], translate: Translate) -> _T:
    """Run one SDK request; its exceptions come out as `translate`'s `RegistrationError`s."""
    try:
        return request()
    except RegistrationError:
        raise
    except Exception as error:  # noqa: BLE001 - every SDK failure is translated, none passes raw
        raise translate(operation, error) from None


def error_text(error: BaseException) -> str:
    """``Type: message`` of an SDK exception (just ``Type`` when it has no message), not yet redacted."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
