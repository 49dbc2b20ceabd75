"""Plant gateways: MQTT and OPC-UA → ``<prefix>sensor.<modality>`` (and ``<prefix>deadletter``).

* :mod:`~streamfuse.ingest.mapping` — the declarative mapping file (pure);
* :mod:`~streamfuse.ingest.decode` — a message → a validated ``SensorEvent`` (pure);
* :mod:`~streamfuse.ingest.gaps` — stale values and gaps after an OPC-UA reconnect (pure);
* :mod:`~streamfuse.ingest.sink` — the Kafka side, acknowledged record by record;
* :mod:`~streamfuse.ingest.mqtt` / :mod:`~streamfuse.ingest.opcua` — the thin adapters,
  whose docstrings state the delivery guarantee each gives.
"""
