"""The cold-start and throughput baseline: a hello-world Pub/Sub function, run exactly like ours."""
import sys

import functions_framework


@functions_framework.cloud_event
def hello(cloud_event):
    sys.stdout.write(f"hello {cloud_event['id']}\n")  # one write: lines from concurrent requests never interleave
    sys.stdout.flush()
