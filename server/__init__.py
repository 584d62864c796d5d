"""vmcast's server: offers the images of a directory over HTTP and streams them over UDP multicast.

`vmcast.server.app` is the FastAPI application, `vmcast.server.cli` the `vmcast` command. Below them: the
catalog of images (`catalog`), their raw conversions and manifests (`conversion`, `manifests`,
`fingerprints`, `preparation`), the streams and leases (`registry`) and the paced sender (`sender`, `pacing`).
"""
