"""The tests use the local stack's Healthcare API client (stack/hcapi.py)."""
from stack.hcapi import HC, unique  # noqa: F401
