"""Helpers for the worker-side integration tests: client adapters and the worker subprocess script."""
