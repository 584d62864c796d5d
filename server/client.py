"""A small synchronous client of the server's HTTP API (what `vmcast stream ...` uses; receivers may too).

Answers are parsed into the API's own models (`vmcast.server.api.schemas`), so a field the server renamed is
an error here rather than a ``KeyError`` somewhere later.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from .api.schemas import Image, LeaseInfo, LeaseReleased, Stream, StreamRequest, StreamStarted
from .defaults import DEFAULT_SERVER, START_TIMEOUT
from .errors import ServerRefused, ServerUnreachable

# Listing and releasing answer at once. Starting may convert and hash an image first, so it waits for as
# long as `start_timeout` says (`defaults.START_TIMEOUT` unless told).
REQUEST_TIMEOUT = 10.0

_Model = TypeVar("_Model")


class ServerClient:
    """Talks to one vmcast server.

    Error handling: `ServerUnreachable` when there is no HTTP answer; `ServerRefused` for an error status,
    with the server's own ``detail``, or for an answer that is not what the API promises.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        *,
        start_timeout: float = START_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._start_timeout = start_timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT, transport=transport)

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def start_stream(self, image: str, format: str = "raw", *, min_receivers: int | None = None, max_wait: float | None = None) -> StreamStarted:
        hold = ({"min_receivers": min_receivers} if min_receivers else {}) | ({"max_wait": max_wait} if max_wait is not None else {})
        body = StreamRequest(image=image, format=format, **hold).model_dump()
        return self._call("POST", "/v1/streams", StreamStarted, json=body, timeout=self._start_timeout)

    def release(self, lease_id: str) -> LeaseReleased:
        return self._call("DELETE", f"/v1/leases/{lease_id}", LeaseReleased)

    def renew(self, lease_id: str) -> LeaseInfo:
        """Keep a lease alive for another `lease_ttl`; `ServerRefused` with status 404 once it has ended."""
        return self._call("POST", f"/v1/leases/{lease_id}/renew", LeaseInfo)

    def streams(self) -> list[Stream]:
        return self._call("GET", "/v1/streams", list[Stream])

    def stream(self, stream_id: str) -> Stream:
        return self._call("GET", f"/v1/streams/{stream_id}", Stream)

    def images(self) -> list[Image]:
        return self._call("GET", "/v1/images", list[Image])

    def _call(self, method: str, path: str, answer: type[_Model] | Any, **options: Any) -> _Model:
        try:
            response = self._http.request(method, path, **options)
        except httpx.TimeoutException:
            raise ServerUnreachable(url=self.base_url, reason="no answer in time") from None
        except httpx.HTTPError as error:
            raise ServerUnreachable(url=self.base_url, reason=_reason(error)) from None
        if response.is_error:
            raise ServerRefused(status=response.status_code, detail=_detail(response))
        try:
            if isinstance(answer, type) and issubclass(answer, BaseModel):
                return answer.model_validate_json(response.content)
            return TypeAdapter(answer).validate_json(response.content)
        except ValidationError as error:
            raise ServerRefused(
                status=response.status_code,
                detail=f"an answer this client does not understand (is it a vmcast server?): {error}",
            ) from None


def _reason(error: httpx.HTTPError) -> str:
    # httpx wraps the OS error; its innermost message ("Connection refused") is the useful one.
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return text


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI's own validation errors: a list of {"loc", "msg"}
        return "; ".join(
            f"{'.'.join(map(str, item.get('loc', [])))}: {item.get('msg')}" for item in detail if isinstance(item, dict)
        )
    return response.text[:200] or response.reason_phrase
