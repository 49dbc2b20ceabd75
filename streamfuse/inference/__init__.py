"""Inference workers: micro-batching, model running, contributions, commands."""
