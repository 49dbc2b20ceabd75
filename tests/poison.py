"""Malformed records for the poison-record tests (unit and integration): every kind of
record a consumer of ``samples`` must dead-letter without stopping."""

from __future__ import annotations

import random

import msgpack
import numpy as np

KINDS = ("random_bytes", "truncated", "wrong_type", "unknown_schema", "oversize", "non_jpeg_image",
         "nan_series", "not_a_map", "corrupt_jpeg", "bit_flips")


def malformed_records(valid: list[bytes], n: int, seed: int, oversize_to: int) -> list[tuple[bytes, bool, str]]:
    """``n`` records made from the ``valid`` sample records, cycling through :data:`KINDS`.

    Returns:
        ``(value, surely_bad, kind)``; ``bit_flips`` records may still decode (not surely bad).
        ``corrupt_jpeg`` has a JPEG header and a broken body: it fails only where images are
        decoded (the worker's batch), the rest of its sample is still served.
    """
    rng = random.Random(seed)

    def one(i: int) -> tuple[bytes, bool, str]:
        kind = KINDS[i % len(KINDS)]
        raw = valid[i % len(valid)]
        good = msgpack.unpackb(raw, raw=False)
        reading = next(iter(good["readings"].values()))
        if kind == "random_bytes":
            return rng.randbytes(rng.randint(0, 300)), True, kind
        if kind == "truncated":
            return raw[: rng.randint(1, len(raw) - 1)], True, kind
        if kind == "wrong_type":
            field, value = rng.choice([
                ("sample_id", 7), ("readings", [1, 2]), ("readings", {"series": 3}), ("ts_ms", "soon"),
                ("missing", {"a": 1}), ("asset_id", None),
                ("readings", {reading["modality"]: {**reading, "payload": "text"}}),
                ("readings", {"series": {**reading, "modality": "series", "shape": ["a"]}}),
            ])
            return msgpack.packb({**good, field: value}), True, kind
        if kind == "unknown_schema":
            return msgpack.packb({**good, "schema": rng.choice(["sf.sample/2", "sf.sample/0", 3, None])}), True, kind
        if kind == "oversize":
            return msgpack.packb({**good, "pad": b"\x00" * (oversize_to - len(raw) + 1)}), True, kind
        if kind == "non_jpeg_image":
            image = {**reading, "modality": "image", "payload": b"GIF89a" + rng.randbytes(64), "encoding": "jpeg"}
            return msgpack.packb({**good, "readings": {**good["readings"], "image": image}}), True, kind
        if kind == "nan_series":
            nan = np.array([1.0, np.nan, 2.0, np.inf] * 8, dtype="<f4").tobytes()
            series = {**reading, "modality": "series", "payload": nan, "shape": None, "encoding": ""}
            return msgpack.packb({**good, "readings": {**good["readings"], "series": series}}), True, kind
        if kind == "not_a_map":
            return msgpack.packb([good]), True, kind
        if kind == "corrupt_jpeg" and "image" in good["readings"]:
            image = good["readings"]["image"]
            body = image["payload"]
            return msgpack.packb({**good, "readings": {**good["readings"], "image": {
                **image, "payload": body[: len(body) // 3] + rng.randbytes(len(body) // 3)}}}), True, kind
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), False, "bit_flips"

    return [one(i) for i in range(n)]
