"""vmcast's server: offers the images of a directory over HTTP and streams them over UDP multicast.

`vmcast.server.app` is the FastAPI application, `vmcast.server.cli` the `vmcast` command. Below them: the
catalog of images (`catalog`), their conversions and manifests (`conversion`, `manifests`,
`fingerprints`, `preparation`), the streams and leases (`registry`) kept across restarts (`state`), the paced
sender (`sender`, `pacing`), the repair listener that feeds it receivers' requests (`repair_listener`), the
HTTP range fallback (`byte_ranges`, `throttle`, `api.stream_data`) and the Prometheus metrics (`metrics`).
"""
