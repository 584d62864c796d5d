"""How the server's exceptions become HTTP answers: one table, one handler, a ``{"detail": ...}`` body.

The body has the same shape as FastAPI's own `HTTPException` answers, so a client reads every error alike.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .. import errors
from ..sources import STATUS_OF as SOURCE_STATUS_OF

log = logging.getLogger(__name__)

# Most specific first: the first class an exception is an instance of decides.
STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    *SOURCE_STATUS_OF,
    (errors.ImageNotFound, 404),
    (errors.StreamNotFound, 404),
    (errors.StreamNotRunning, 404),
    (errors.LeaseNotFound, 404),
    (errors.FormatNotOffered, 422),
    (errors.ImageChanged, 409),
    (errors.GroupsExhausted, 503),
    (errors.StateUnwritable, 503),
    (errors.ImageUnreadable, 500),
    (errors.ConversionFailed, 500),
    (errors.ServerError, 500),
)


def status_of(error: errors.ServerError) -> int:
    return next(status for kind, status in STATUS_OF if isinstance(error, kind))


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, errors.ServerError)
    status = status_of(error)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, error)
    return JSONResponse(status_code=status, content={"detail": str(error)})


async def _os_error(request: Request, error: Exception) -> JSONResponse:
    # An image or cache file that cannot be read or written (permissions, disk full): say which and why.
    assert isinstance(error, OSError)
    log.error("%s %s: %s", request.method, request.url.path, error)
    where = f" ({error.filename})" if error.filename else ""
    return JSONResponse(status_code=500, content={"detail": f"file system error{where}: {error.strerror or error}"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.ServerError, _server_error)
    app.add_exception_handler(OSError, _os_error)
