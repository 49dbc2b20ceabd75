"""Synchronizer: per-modality readings -> multi-modal samples.

``core`` is the pure event-time logic (slots, watermark, checkpoints), ``task`` one
consumer task around it (records in, samples and dead letters out; the caller passes the
clock), ``app`` the ``streamfuse sync`` Kafka process.
"""
