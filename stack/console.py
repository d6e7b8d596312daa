"""The web console's Service page in the local stack (healthcare_emulator/README.md, "The web console").

The console lives in the Healthcare API emulator (`/console`); its Service page reads the export
service's ledger from the Firestore emulator and the events from its own subscription to the events
topic. The stack gives the emulator these settings when it starts it, and creates the subscription with
the topics, so the page has every event from the stack's start (healthcare_emulator/console/service.py).
"""
from __future__ import annotations

LEDGER_COLLECTION = "dicomExports"           # the functions' LEDGER_COLLECTION (Stack.function_env)
EVENTS_SUBSCRIPTION = "dicom-export-events-console"


def emulator_env(firestore_host_port: str, project: str) -> dict:
    """No HC_CONSOLE_EVENTS_TOPIC: the stack creates the subscription (Stack._topics), the console only waits
    for it, so the two never race to create it."""
    return {"HC_CONSOLE_FIRESTORE_EMULATOR_HOST": firestore_host_port,
            "HC_CONSOLE_LEDGER_COLLECTION": LEDGER_COLLECTION, "HC_CONSOLE_SERVICE_PROJECT": project,
            "HC_CONSOLE_EVENTS_SUBSCRIPTION": f"projects/{project}/subscriptions/{EVENTS_SUBSCRIPTION}"}
