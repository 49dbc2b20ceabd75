"""The alerts API through a Redis outage (a private redis-server stopped and started):
it keeps serving, answers 503 with Retry-After meanwhile, and works again after."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chaoslib import RedisServer
from streamfuse.alerts.api import make_app
from alertlib import isolated_settings

pytestmark = pytest.mark.integration


def test_api_answers_503_during_a_redis_outage_and_recovers(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        s = isolated_settings("127.0.0.1:9").model_copy(update={"redis_url": server.url})

        async def scenario(client) -> None:
            assert (await client.get("/subscriptions")).status == 200
            server.stop()
            for path in ("/subscriptions", "/silences", "/alerts"):
                resp = await client.get(path)
                body = await resp.json()
                assert resp.status == 503 and resp.headers["Retry-After"] == "5", (path, resp.status, body)
                assert "Redis is unreachable" in body["error"]
            assert (await client.get("/openapi.json")).status == 200  # the process itself serves on
            health = await client.get("/healthz")  # and says what is wrong
            assert health.status == 503 and "Redis" in (await health.json())["error"]
            server.start()
            assert (await client.get("/subscriptions")).status == 200

        async def main() -> None:
            async with TestClient(TestServer(make_app(s))) as client:
                await scenario(client)

        asyncio.run(main())
