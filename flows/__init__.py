"""Prefect flows: the wiring of tasks into runs."""
