"""Fixtures for the receiver tests; they live in receiver_testbed.py, a name no other test folder shares."""

from .receiver_testbed import image, lease_server, loop_device, make_sender  # noqa: F401 (fixtures)
