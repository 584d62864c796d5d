"""``vmcast receive --register glance|ec2``: register the received image in a cloud once it is verified.

In order, and why:

1. Before the receive, the cloud's configuration is loaded (`prepare`; no request is made yet), so a typo in
   ``--os-cloud`` or missing AWS credentials fail at once (exit 8) rather than after minutes of receiving.
2. The receive verifies and fsyncs the output, saves its state file with ``"verified": true``, and releases
   its lease: a registration can take minutes, and the stream should not be held for it.
3. `register` hands the receive's `VerifiedImage` (``ReceiveResult.proof``, the only kind of image the
   registration functions take) to `register_in_glance` or `register_in_ec2`.

Registration runs in the main thread, after the receive's trio loop has ended, not in a trio worker thread:
no event loop is left to block, and a worker thread cannot be interrupted, so Ctrl-C would have to wait for
the upload to finish. In the main thread Ctrl-C, and SIGTERM (turned into `KeyboardInterrupt` while it
runs), reach the registration, which deletes whatever it had created (registration/glance.py, ec2.py).

Error handling: `RegistrationError` subclasses (exit codes 4, 7-10; `vmcast.receiver.registration.errors`),
their messages already free of credentials; use `redact` with `Prepared.secrets` on anything else shown.
The verified output and its state file are kept whatever happens, so ``vmcast register PATH --glance``
(or ``--ec2``) can try again.
Resource handling: `Prepared.close` closes the OpenStack connection (boto3 sessions hold nothing to close).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

# CLOUDS and VISIBILITIES are defined there, for the command's options (without importing this module).
from .defaults import CLOUDS, VISIBILITIES
from .registration.errors import RegistrationError, redact
from .registration.registered import RegisteredImage
from .verified import VerifiedImage


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterRequest:
    """What ``--register`` and its companion options asked for."""

    cloud: Literal["glance", "ec2"]
    name: str | None = None
    """Image or AMI name; None: the image's name on the server, else the output's file name."""
    visibility: str = "private"
    """Glance only."""
    os_cloud: str | None = None
    """Glance only: the cloud in clouds.yaml; None: OS_CLOUD or the OS_* variables."""
    region: str | None = None
    """EC2 only: None: AWS_DEFAULT_REGION or the profile's."""


@dataclass(slots=True)
class Prepared:
    """A cloud ready to register into: an openstacksdk connection or a boto3 session, and its secrets."""

    request: RegisterRequest
    client: Any
    secrets: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.request.cloud == "glance" and self.client is not None:
            self.client.close()

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)


def prepare(request: RegisterRequest) -> Prepared:
    """Load the cloud's configuration and credentials, without a request. Raises `RegistrationError` (exit 8)."""
    # The same set-up as `vmcast register`, so both commands read clouds.yaml / OS_* / AWS_* alike, and the
    # secrets they find are the ones redacted from messages.
    from .registration.cli import _boto3_session, _openstack_connection

    secrets: list[str] = []
    if request.cloud == "glance":
        client = _openstack_connection(request.os_cloud, secrets)
    else:
        client = _boto3_session(request.region, secrets)
    return Prepared(request=request, client=client, secrets=secrets)


def register(prepared: Prepared, image: VerifiedImage, *, default_name: str) -> RegisteredImage:
    """Register `image` (blocking, in the main thread). Raises `RegistrationError`, or `KeyboardInterrupt`."""
    request = prepared.request
    name = request.name or default_name
    with _sigterm_interrupts():
        if request.cloud == "glance":
            from .registration.glance import register_in_glance

            return register_in_glance(image, connection=prepared.client, name=name, visibility=request.visibility)
        from .registration.ec2 import register_in_ec2

        return register_in_ec2(image, name=name, session=prepared.client, region=request.region)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises `KeyboardInterrupt` meanwhile, so the registration cleans up as it does for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(number).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["CLOUDS", "VISIBILITIES", "Prepared", "RegisterRequest", "RegistrationError", "prepare", "register"]
