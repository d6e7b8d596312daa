"""The pure core: rules and records, no I/O, no settings, no adapters."""
