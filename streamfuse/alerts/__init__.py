"""Alerts: lifecycle (pure), subscriptions and silences (Redis), delivery (webhooks,
Alertmanager, Redis pub/sub), the HTTP API and the ``streamfuse alerts`` commands.

Nothing heavy is imported here: ``streamfuse.config`` imports :mod:`streamfuse.alerts.config`.
"""
