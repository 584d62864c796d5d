"""GET /metrics: the server's counters in the Prometheus text format, parsed by prometheus-client's own parser."""

from __future__ import annotations

import time

from .server_testing import Images, TestClient, samples


def test_metrics_show_every_stream_its_leases_and_the_repair_counters(client: TestClient, images: Images) -> None:
    started = client.post("/v1/streams", json={"image": images.raw}).json()
    client.post("/v1/streams", json={"image": images.raw})
    time.sleep(0.3)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    labels = (
        ("format", "raw"),
        ("group", started["group"]),
        ("image", images.raw),
        ("stream_id", started["stream_id"]),
    )
    assert samples(text, "vmcast_stream_bytes_sent_total")[labels] > 100_000
    assert samples(text, "vmcast_stream_datagrams_sent_total")[labels] > 70
    assert samples(text, "vmcast_stream_loops_completed_total")[labels] >= 0
    assert samples(text, "vmcast_stream_leases")[labels] == 2
    for name in (
        "vmcast_stream_repair_requests_total",
        "vmcast_stream_repair_frames_sent_total",
        "vmcast_stream_parity_frames_sent_total",
        "vmcast_stream_parity_cpu_seconds_total",
        "vmcast_stream_parity_deferred_total",
        "vmcast_stream_repair_pending",
        "vmcast_stream_repair_drops_total",
    ):
        assert samples(text, name)[labels] == 0, name
    assert samples(text, "vmcast_streams_running") == {(): 1}
    assert samples(text, "vmcast_leases_active") == {(): 2}
    reasons = {dict(key)["reason"] for key in samples(text, "vmcast_repair_requests_dropped_total")}
    assert reasons == {"too_short", "too_long", "unknown_stream", "malformed_request", "backlog_full"}
    assert samples(text, "vmcast_range_rate_limit_bits_per_second") == {(): 200e6}


def test_a_stopped_stream_leaves_the_metrics(client: TestClient, images: Images) -> None:
    started = client.post("/v1/streams", json={"image": images.raw}).json()
    client.delete(f"/v1/leases/{started['lease_id']}")
    text = client.get("/metrics").text
    assert samples(text, "vmcast_stream_bytes_sent_total") == {}
    assert samples(text, "vmcast_streams_running") == {(): 0}
