"""Fixtures for the receiver tests; they live in receiver_testbed.py and real_server.py, names no other test folder shares."""

from .real_server import real_server  # noqa: F401 (fixture)
from .receiver_testbed import image, lease_server, loop_device, make_sender  # noqa: F401 (fixtures)
