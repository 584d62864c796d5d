"""Shared pytest set-up: the cloud servers plugin (real Keystone, Glance and moto; tests/services)."""

pytest_plugins = ["tests.services.cloud_fixtures"]
