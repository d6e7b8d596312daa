"""Fixtures of the service tests: the function under test, run as in production (tests/support/function.py),
and the ingest function's pieces wired to the emulators (tests/support/ingest.py)."""
from tests.support.function import emulator_env, hcapi, make_function, module_function, pubsub_clients  # noqa: F401
from tests.support.ingest import pieces  # noqa: F401
