"""Constants the command line needs to build its options, shared with the settings and the API client.

Apart so that every ``vmcast`` subcommand can state its defaults and limits without importing the modules
that own them: `vmcast.server.client` loads the API's pydantic models (and through them the stream
registry, the sender and sqlite3), `vmcast.server.settings` loads pydantic-settings: ~0.1 s and ~90 modules
that ``vmcast receive`` would otherwise load before asking for its lease. Standard library and
`vmcast.protocol` only.
"""

from __future__ import annotations

from vmcast.protocol import HEADER_SIZE
from vmcast.protocol.frames import MAX_DATAGRAM

DEFAULT_SERVER = "http://127.0.0.1:8470"
"""The HTTP API of a ``vmcast serve`` on this machine with its default --host and --port."""

# Starting a stream may convert and hash an image first (minutes for a large qcow2 the first time), so a
# client waits this long for the answer.
START_TIMEOUT = 3600.0

MAX_PAYLOAD = MAX_DATAGRAM - HEADER_SIZE
"""The largest --payload: what the largest UDP/IPv4 datagram holds after the frame header."""

DEFAULT_MAX_WAIT = 30.0
"""How long a stream started with min_receivers > 1 holds for them at most, unless the start says otherwise."""
