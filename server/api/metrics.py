"""``/metrics``: the server's counters for Prometheus (`vmcast.server.metrics`).

The format follows the scraper's ``Accept`` header (prometheus-client's own negotiation): the classic
Prometheus text format by default, OpenMetrics when asked for.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}},
)
def metrics(request: Request) -> Response:
    # A plain `def`: collecting takes the registry's lock, so it runs in a worker thread.
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(request.app.state.services.metrics), headers={"content-type": content_type})
