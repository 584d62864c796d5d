"""How an SDK call of a registration comes out as a `RegistrationError`, whatever the SDK raised.

Glance (openstacksdk/keystoneauth) and EC2 (botocore) differ in *which* `RegistrationError` an exception
becomes: each has its own ``translate(operation, error)``. What they share is the policy of
`vmcast.sdk.translation`, applied here with `RegistrationError` as the error that passes as it is; every
other exception is translated, unchained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from vmcast.sdk import translation as sdk_translation
from vmcast.sdk.translation import error_text

from .errors import RegistrationError

__all__ = ["Translate", "error_text", "translated_call"]

Translate = Callable[[str, Exception], RegistrationError]
"""``translate(operation, error)``: the `RegistrationError` that says `operation` failed with `error`."""

_T = TypeVar("_T")


def translated_call(operation: str, request: Callable[[], _T], translate: Translate) -> _T:
    """Run one SDK request; its exceptions come out as `translate`'s `RegistrationError`s."""
    return sdk_translation.translated_call(operation, request, translate, passes=RegistrationError)
