"""Secrets out of messages: `redact`, for the registration's errors and every log line ``vmcast receive`` prints.

Apart from `vmcast.receiver.registration.errors` (which re-exports it) so that a receive without
``--register`` redacts its log lines without importing the registration code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "***"

# Secrets shorter than this are not searched for: replacing every "a" of a message helps nobody, and real
# passwords and keys are longer.
_MIN_SECRET_LENGTH = 4

# Anything that looks like a credential assignment in free text (a request body, a URL query, a config
# dump), whatever its value: `password=...`, `"secret_access_key": "..."`, `X-Auth-Token: ...`.
_ASSIGNMENT = re.compile(
    r"""(?ix)
    (?P<key>["']?[\w-]*(?:password|passwd|secret|token|credential|signature)[\w-]*["']?\s*[:=]\s*)
    (?P<value>"[^"]*"|'[^']*'|[^\s,;&}"']+)
    """
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with each of `secrets` and every ``password=value``-like assignment replaced by ``***``."""
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _ASSIGNMENT.sub(lambda match: match["key"] + REDACTED, text)
