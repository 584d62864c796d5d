"""sdk.translation: a domain error passes as it is, every other exception becomes the caller's, unchained."""

from __future__ import annotations

import pytest
from vmcast.sdk.translation import error_text, translated_call


class DomainError(Exception):
    """The caller's root exception: what `passes`."""


class Translated(DomainError):
    def __init__(self, *, operation: str, error: Exception) -> None:
        super().__init__(f"{operation} failed: {error_text(error)}")
        self.operation = operation
        self.error = error


def translate(operation: str, error: Exception) -> DomainError:
    return Translated(operation=operation, error=error)


def raising(error: Exception):
    def request():
        raise error

    return request


def test_the_return_value_of_the_request_comes_back_unchanged():
    result = object()

    assert translated_call("get image", lambda: result, translate, passes=DomainError) is result


def test_a_domain_error_raised_by_the_request_passes_as_the_same_object():
    raised = DomainError("already said in the caller's terms")

    with pytest.raises(DomainError) as caught:
        translated_call("get image", raising(raised), translate, passes=DomainError)

    assert caught.value is raised


def test_any_other_exception_becomes_the_translated_one_without_a_chain_to_the_sdk_exception():
    sdk_error = ConnectionError("Authorization: Bearer secret-token")

    with pytest.raises(Translated) as caught:
        translated_call("get image", raising(sdk_error), translate, passes=DomainError)

    assert caught.value.operation == "get image"
    assert caught.value.error is sdk_error
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True


def test_an_exception_of_another_domain_is_translated_too():
    class OtherDomainError(Exception):
        pass

    with pytest.raises(Translated):
        translated_call("get image", raising(OtherDomainError()), translate, passes=DomainError)


def test_error_text_is_type_and_message_without_surrounding_whitespace():
    assert error_text(TimeoutError("  read timed out \n")) == "TimeoutError: read timed out"


def test_error_text_is_just_the_type_when_there_is_no_message():
    assert error_text(TimeoutError()) == "TimeoutError"
    assert error_text(TimeoutError("   ")) == "TimeoutError"
