"""The tests start services with the local stack's own process manager (stack/services.py)."""
from stack.services import (  # noqa: F401
    ROOT,
    Service,
    firestore_emulator,
    free_port,
    gcs_emulator,
    healthcare_emulator,
    pubsub_emulator,
)
