"""Settings of alert routing and delivery (``STREAMFUSE_ALERTS__*``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AlertSettings(BaseModel):
    group: str = "sf-alert-dispatch"  # consumer group of `streamfuse alerts dispatch`
    allow_private_targets: bool = False  # webhooks to 10/8, 172.16/12, 192.168/16, loopback
    request_timeout_s: float = Field(5.0, gt=0)
    give_up_s: float = Field(3600.0, gt=0)  # then the notification goes to the dead-letter topic
