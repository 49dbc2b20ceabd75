"""OpenAPI 3.0 description of the ``streamfuse alerts serve`` HTTP API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

_ERR = {"description": "what was wrong and how to fix it",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(ref: str, description: str, array: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{ref}"}
    if array:
        schema = {"type": "array", "items": schema}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _id_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


MATCHERS = {"type": "array", "items": {"type": "string", "example": "modality=~image|audio"},
            "description": "label matchers NAME=VALUE, NAME!=VALUE, NAME=~REGEX, NAME!~REGEX (all must match)"}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "streamfuse alerts", "version": "1",
             "description": "Subscriptions, silences and a live stream of streamfuse alerts. When "
                            "STREAMFUSE_ALERTS__API_TOKEN is set, every path but /healthz and /openapi.json "
                            "wants `Authorization: Bearer <token>` (401 without); off a loopback address the "
                            "API does not start without a token or mTLS. Request bodies must be "
                            "application/json (415 otherwise). Secrets are never returned and webhook URLs "
                            "are shown as scheme://host:port/... only."},
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {"get": {"summary": "Liveness and Redis reachability", "security": [],
                             "responses": {"200": {"description": "ok"}, "503": _ERR}}},
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3"}}}},
        "/subscriptions": {
            "get": {"summary": "List subscriptions (secrets are never returned)",
                    "responses": {"200": _json("Subscription", "all subscriptions", array=True)}},
            "post": {"summary": "Create a subscription (an existing id is a conflict: delete it first)",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/NewSubscription"}}}},
                     "responses": {"201": _json("Subscription", "created"), "400": _ERR, "401": _ERR,
                                   "409": _ERR, "415": _ERR}},
        },
        "/subscriptions/{id}": {
            "parameters": [_id_param("id")],
            "get": {"summary": "One subscription", "responses": {"200": _json("Subscription", "found"), "404": _ERR}},
            "delete": {"summary": "Delete a subscription and what is queued for it",
                       "responses": {"204": {"description": "deleted"}, "404": _ERR}},
        },
        "/silences": {
            "get": {"summary": "Active and pending silences",
                    "responses": {"200": _json("Silence", "silences", array=True)}},
            "post": {"summary": "Mute matching alerts for a while",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/NewSilence"}}}},
                     "responses": {"201": _json("Silence", "created"), "400": _ERR, "401": _ERR,
                                   "415": _ERR}},
        },
        "/silences/{id}": {"parameters": [_id_param("id")],
                           "delete": {"summary": "Expire a silence now",
                                      "responses": {"200": _json("Silence", "expired"), "404": _ERR}}},
        "/alerts": {"get": {"summary": "Alerts the dispatcher knows as firing",
                            "responses": {"200": {"description": "alert states",
                                                  "content": {"application/json": {"schema": {"type": "array"}}}}}}},
        "/stats": {"get": {"summary": "Delivery counters",
                           "responses": {"200": {"description": "counters", "content": {
                               "application/json": {"schema": {"type": "object"}}}}}}},
        "/events": {"get": {
            "summary": "Server-sent events: `snapshot` (the firing alerts, once), then one `alert` event per "
                       "lifecycle change (firing, resolved), and comment keep-alives",
            "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {
                "schema": {"type": "string"}}}}}}},
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                  "description": "STREAMFUSE_ALERTS__API_TOKEN"}},
                   "schemas": {
        "Error": {"type": "object", "properties": {"error": {"type": "string"}, "type": {"type": "string"}}},
        "NewSubscription": {"type": "object", "required": ["url"], "properties": {
            "id": {"type": "string", "description": "optional; generated when absent"},
            "url": {"type": "string", "example": "https://hooks.example.com/alerts",
                    "description": "http(s) URL; for `redis`, a pub/sub channel under "
                                   "STREAMFUSE_ALERTS__REDIS_CHANNEL_PREFIX"},
            "receiver": {"type": "string", "enum": ["webhook", "alertmanager", "redis"], "default": "webhook"},
            "matchers": MATCHERS,
            "min_severity": {"type": "string", "enum": ["info", "warning", "critical"], "default": "info"},
            "secret": {"type": "string", "writeOnly": True,
                       "description": "HMAC-SHA256 signing key; stored sealed with STREAMFUSE_ALERTS__SECRET_KEY"}}},
        "Subscription": {"type": "object", "properties": {
            "id": {"type": "string"}, "receiver": {"type": "string"},
            "url": {"type": "string", "example": "https://hooks.example.com/...",
                    "description": "scheme://host:port/... only (paths and queries may hold tokens)"},
            "url_sha256": {"type": "string", "description": "first 16 hex digits of the full URL's SHA-256"},
            "matchers": MATCHERS, "min_severity": {"type": "string"},
            "signed": {"type": "boolean", "description": "a secret is set (it is never returned)"},
            "created_ms": {"type": "integer"}}},
        "NewSilence": {"type": "object", "required": ["matchers"], "properties": {
            "matchers": MATCHERS, "duration": {"type": "string", "example": "2h"},
            "duration_s": {"type": "number"}, "comment": {"type": "string"}, "created_by": {"type": "string"}}},
        "Silence": {"type": "object", "properties": {
            "id": {"type": "string"}, "matchers": MATCHERS, "starts_ms": {"type": "integer"},
            "ends_ms": {"type": "integer"}, "comment": {"type": "string"}, "created_by": {"type": "string"}}},
    }},
}
