"""The HTTP API: one router per resource (images, streams, leases, health), wired by `vmcast.server.app`."""
