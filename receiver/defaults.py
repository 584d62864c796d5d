"""Constants ``vmcast receive`` needs to build its options, shared with the modules that own their meaning.

Apart so that the command (`vmcast.receiver.cli`) can state its defaults without importing those modules:
`agent` loads trio, httpx, pydantic and `vmcast.protocol`, `state` pydantic, `registering` the registration
code; ``vmcast receive --help``, a usage error and ``vmcast serve`` need none of them. Standard library only
(nothing at all, in fact): keep it so.
"""

from __future__ import annotations

DEFAULT_TIMEOUT = 30.0
"""Seconds without anything of the stream (by multicast or by the HTTP fallback) before a receive gives up."""

DEFAULT_FALLBACK_AFTER = 10.0
"""Server mode: seconds without anything of the stream by multicast before the image is fetched by HTTP."""

RECEIVE_BUFFER_AUTO = "auto"
"""The ``--rcvbuf`` that sizes the buffer from the memory the receiver may use (`multicast.auto_receive_buffer`)."""

STATE_SUFFIX = ".vmcast.json"
"""The state file is the output's path plus this (the name ``vmcast register`` looks for)."""

CLOUDS = ("glance", "ec2")
"""What ``vmcast receive --register`` registers into."""

VISIBILITIES = ("private", "shared", "community", "public")
"""Glance's image visibilities (``--register glance --visibility``)."""
