"""Decisions of the service's functions; external systems are reached only through handlers/adapters."""
