"""The local stack: every service on one machine, wired as in the cloud, and a small client."""
