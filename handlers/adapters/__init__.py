"""One module per external system, reached over REST through transport.py. Adapters read no settings:
handlers/wiring.py builds them and passes what they need."""
