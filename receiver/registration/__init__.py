"""Register a verified image into a cloud: OpenStack Glance or EC2 (an AMI on an EBS snapshot).

Both entry points take only a `vmcast.receiver.verified.VerifiedImage` (CONVENTIONS.md point 7), are
idempotent (an identical image already registered is returned with ``created=False``), leave nothing
half-registered on failure, and raise only `RegistrationError` subclasses, whose messages never carry
credentials (see `errors`):

* `register_in_glance(image, *, connection, name, visibility="private", properties=None, timeout=600)`
* `register_in_ec2(image, *, name, session=None, region=None, parallelism=8)`

Both block; from trio, call them with ``trio.to_thread.run_sync``. ``vmcast register`` (`cli.register`) is
the command-line front end. openstacksdk and boto3 (the ``clouds`` extra) are imported only by the module that
needs them, so this package imports without either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import RegistrationError
from .registered import RegisteredImage

if TYPE_CHECKING:
    from .ec2 import register_in_ec2
    from .glance import register_in_glance

__all__ = ["RegisteredImage", "RegistrationError", "register_in_ec2", "register_in_glance"]


def __getattr__(name: str) -> Any:
    # Lazily, so that `--ec2` works without openstacksdk installed and `--glance` without boto3.
    if name == "register_in_glance":
        from .glance import register_in_glance

        return register_in_glance
    if name == "register_in_ec2":
        from .ec2 import register_in_ec2

        return register_in_ec2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
