"""The cold-start baseline: a hello-world Pub/Sub function, run exactly like ours."""
import functions_framework


@functions_framework.cloud_event
def hello(cloud_event):
    print("hello", cloud_event["id"], flush=True)
