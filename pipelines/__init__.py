"""Prefect flows: thin orchestration over :mod:`segflow` and the Ray actors in ``workers``."""
