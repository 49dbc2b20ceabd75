"""Thin process entry points, one per pipeline process: ``python -m workers.inference``,
``workers.sync``, ``workers.monitor``, ``workers.alerts`` (the same as the matching
``streamfuse`` commands)."""
