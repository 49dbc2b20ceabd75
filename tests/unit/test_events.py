"""Wire codec: msgpack and JSON round trips for every schema, and every kind of bad input
rejected with the right reason code and a detail that says what is wrong."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import struct
import zlib

import msgpack
import numpy as np
import pytest
from PIL import Image

from streamfuse.errors import InvalidEvent, StreamfuseError
from streamfuse.events import (
    JSON,
    MODALITIES,
    MSGPACK,
    REASONS,
    SCHEMAS,
    Ack,
    Alert,
    Command,
    DeadLetter,
    KpiSnapshot,
    Label,
    Prediction,
    Sample,
    SensorEvent,
    content_type_of,
    decode,
    encode,
    encode_json,
    headers,
    to_map,
)
from streamfuse.readings import MAX_IMAGE_SIDE, check_reading, image_size, split_bad_readings

# ---------------------------------------------------------------------------- builders

RNG = np.random.default_rng(1234)


def jpeg_bytes(w: int = 48, h: int = 32) -> bytes:
    pixels = RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def png_bytes(w: int = 16, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG signature + IHDR (valid CRC) + IEND and no image data: PIL reads the size."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


def pcm16(n_frames: int = 1600, channels: int = 1, rate: int = 16_000) -> bytes:
    t = np.arange(n_frames) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    return np.repeat(tone[:, None], channels, axis=1).tobytes()


def float32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def image_event(payload: bytes | None = None, **kw) -> SensorEvent:
    return SensorEvent(**{
        "event_id": "ev-img-1", "asset_id": "asset-1", "modality": "image", "ts_ms": 1_700_000_000_000,
        "payload": jpeg_bytes() if payload is None else payload, "line_id": "line-a", "encoding": "jpeg", **kw,
    })


def audio_event(payload: bytes | None = None, **kw) -> SensorEvent:
    return SensorEvent(**{
        "event_id": "ev-aud-1", "asset_id": "asset-1", "modality": "audio", "ts_ms": 1_700_000_000_010,
        "payload": pcm16() if payload is None else payload, "line_id": "line-a", "encoding": "pcm16le",
        "sample_rate": 16_000, "channels": 1, **kw,
    })


def series_event(payload: bytes | None = None, **kw) -> SensorEvent:
    values = np.sin(np.linspace(0, 6, 3 * 64)).reshape(3, 64)
    return SensorEvent(**{
        "event_id": "ev-ser-1", "asset_id": "asset-1", "modality": "series", "ts_ms": 1_700_000_000_020,
        "payload": float32(values) if payload is None else payload, "line_id": "line-a",
        "encoding": "float32le", "shape": (3, 64), **kw,
    })


def sample(**readings: SensorEvent) -> Sample:
    if not readings:
        readings = {"image": image_event(), "audio": audio_event(), "series": series_event()}
    return Sample("smp-1", "asset-1", 1_700_000_000_000, readings, line_id="line-a")


def all_events() -> list:
    """One realistic instance of every schema (several for SensorEvent)."""
    return [
        image_event(),
        image_event(png_bytes(), encoding="png", event_id="ev-img-png"),
        audio_event(pcm16(800, channels=2, rate=48_000), sample_rate=48_000, channels=2),
        series_event(),
        sample(),
        Sample("smp-2", "asset-2", 1_700_000_000_500, {"series": series_event()}, missing=("audio", "image")),
        Prediction(
            sample_id="smp-1", asset_id="asset-1", ts_ms=1_700_000_000_000, classes=("normal", "bearing", "imbalance"),
            fused_probs=(0.7, 0.2, 0.1), fused_label="normal", fusion_mode="ume",
            modality_probs={"image": (0.8, 0.15, 0.05), "audio": (0.6, 0.25, 0.15)}, line_id="line-a",
            missing=("series",), masked=(), contributions={"image": 0.75, "audio": 0.25},
            versions={"image": "v3", "audio": "v1", "fusion": "ume-1"}, worker_id="w-0",
            produced_ms=1_700_000_000_042, latency_ms=12.5,
        ),
        Label("smp-1", "asset-1", 1_700_000_000_000, "normal", line_id="line-a"),
        KpiSnapshot("global", "", "image", 0, 5_000, n=40, n_labelled=30, accuracy=2 / 3, accuracy_low=0.49,
                    accuracy_high=0.81, macro_f1=0.6, agreement=0.9, mean_confidence=0.77,
                    mean_contribution=1 / 3, missing_rate=0.05, masked_rate=0.0, mean_latency_ms=None),
        KpiSnapshot("asset", "asset-1", "fused", 5_000, 10_000, n=0),
        Alert("9b10b81f6a725174", "9b10b81f6a725174@22000", "firing", "degradation", "critical", "image", "global",
              "", 22_000, 22_000, summary="fleet: image accuracy 0.10 < 0.75",
              labels={"kind": "degradation", "modality": "image"}, value=0.1, threshold=0.75),
        Alert("fp", "fp@1", "resolved", "degradation", "warning", "audio", "asset", "asset-1", 1, 9, ends_ms=9),
        Command("fp@1:mask_modality", "mask_modality", 22_000, modality="image", alert_id="fp@1", reason="degraded"),
        Command("c-2", "set_fusion_mode", 1, fusion_mode="ume"),
        Ack("fp@1:mask_modality", "w-0", "applied", 22_010, masked=("image",),
            versions={"image": "v3", "fusion": "ume-1"}, fusion_mode="ume"),
        DeadLetter("bad_image", "payload is neither JPEG nor PNG", "sf.samples", b"\x00\x01\xff raw", "worker",
                   1_700_000_000_000, partition=2, offset=41, key=b"asset-1", content_type=MSGPACK, modality="image"),
        DeadLetter("undecodable", "x", "sf.labels", b"", "monitor", 1),
    ]


def ids(events: list) -> list[str]:
    return [f"{type(e).__name__}-{i}" for i, e in enumerate(events)]


EVENTS = all_events()


def raw_map(event) -> dict:
    """The event's msgpack map, as a client would build it (mutable, for corrupting)."""
    return msgpack.unpackb(encode(event), raw=False)


def reject(data: bytes, content_type: str = "", **kw) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode(data, content_type, **kw)
    assert info.value.reason in REASONS
    assert isinstance(info.value, StreamfuseError)
    return info.value


def reject_reading(ev: SensorEvent, **kw) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        check_reading(ev, **kw)
    assert info.value.reason in REASONS
    return info.value


# ---------------------------------------------------------------------------- round trips


def test_every_schema_is_covered() -> None:
    assert {type(e) for e in EVENTS} == set(SCHEMAS.values())
    assert all(cls.SCHEMA == name for name, cls in SCHEMAS.items())


@pytest.mark.parametrize("event", EVENTS, ids=ids(EVENTS))
def test_round_trip_msgpack(event) -> None:
    data = encode(event)
    assert msgpack.unpackb(data, raw=False)["schema"] == event.SCHEMA
    assert decode(data, MSGPACK) == event
    assert decode(data) == event  # no header: sniffed as msgpack


@pytest.mark.parametrize("event", EVENTS, ids=ids(EVENTS))
def test_round_trip_json(event) -> None:
    data = encode_json(event)
    raw = json.loads(data)  # plain JSON, readable by any client
    assert raw["schema"] == event.SCHEMA
    assert decode(data, JSON) == event
    assert decode(data, "application/json; charset=utf-8") == event
    assert decode(data) == event  # no header: sniffed as JSON


def test_json_payloads_are_base64() -> None:
    ev = image_event()
    raw = json.loads(encode_json(ev))
    assert base64.b64decode(raw["payload"]) == ev.payload
    smp = json.loads(encode_json(sample()))
    assert base64.b64decode(smp["readings"]["audio"]["payload"]) == audio_event().payload


def test_to_map_schema_first_and_nested() -> None:
    m = to_map(sample())
    assert next(iter(m)) == "schema"
    assert m["readings"]["image"]["schema"] == SensorEvent.SCHEMA
    assert m["readings"]["series"]["shape"] == (3, 64)


def test_decoded_types_are_exact() -> None:
    pred = next(e for e in EVENTS if isinstance(e, Prediction))
    for data, ct in ((encode(pred), MSGPACK), (encode_json(pred), JSON)):
        got = decode(data, ct)
        assert isinstance(got.classes, tuple) and isinstance(got.fused_probs, tuple)
        assert all(isinstance(v, tuple) for v in got.modality_probs.values())
        assert isinstance(got.latency_ms, float)
    smp = decode(encode_json(sample()), JSON)
    assert isinstance(smp.readings["image"], SensorEvent)
    assert smp.readings["series"].shape == (3, 64)
    assert isinstance(smp.readings["image"].payload, bytes)


def test_json_as_kcat_would_produce_it() -> None:
    """Hand-written JSON (json.dumps with its default separators) and a base64 payload."""
    jpeg, pcm = jpeg_bytes(), pcm16(400)
    doc = {
        "schema": "sf.sample/1",
        "sample_id": "kcat-1",
        "asset_id": "asset-9",
        "ts_ms": 1_700_000_000_000,
        "readings": {
            "image": {"event_id": "i", "asset_id": "asset-9", "modality": "image", "ts_ms": 1_700_000_000_000,
                      "payload": base64.b64encode(jpeg).decode(), "encoding": "jpeg"},
            "audio": {"event_id": "a", "asset_id": "asset-9", "modality": "audio", "ts_ms": 1_700_000_000_000,
                      "payload": base64.b64encode(pcm).decode(), "sample_rate": 16000, "channels": None},
        },
    }
    text = json.dumps(doc, indent=2).encode()  # spaces and newlines, as a person would type
    for ct in (JSON, ""):
        got = decode(text, ct, expect=Sample)
        assert got.readings["image"].payload == jpeg
        assert got.readings["audio"].payload == pcm
        assert got.readings["audio"].channels is None  # null for an optional field
        assert got.line_id == "" and got.missing == ()  # defaults for omitted fields
        fixed, errors = split_bad_readings(got)
        assert errors == [] and fixed is got
    label = json.dumps({"schema": "sf.label/1", "sample_id": "kcat-1", "asset_id": "asset-9",
                        "ts_ms": 5, "label": "normal"}).encode()
    assert decode(label, "", expect=(Prediction, Label)) == Label("kcat-1", "asset-9", 5, "normal")
    assert decode(b"\n" + label) == decode(b" " + label) == decode(label)  # leading whitespace sniffed


def test_check_payloads_false_skips_payload_validation() -> None:
    bad = image_event(b"not an image at all")
    with pytest.raises(InvalidEvent):
        decode(encode(bad))
    assert decode(encode(bad), check_payloads=False) == bad


def test_decode_sample_does_not_check_readings() -> None:
    """One bad reading must not reject the whole sample: split_bad_readings handles it."""
    smp = sample(image=image_event(b"\x00" * 10), audio=audio_event())
    assert decode(encode(smp), expect=Sample) == smp


# ---------------------------------------------------------------------------- headers


def test_headers_and_content_type_of() -> None:
    assert headers() == [("content-type", b"application/msgpack")]
    assert headers(JSON) == [("content-type", b"application/json")]
    assert content_type_of(headers(JSON)) == JSON
    assert content_type_of([("trace", b"x"), ("Content-Type", b"application/json")]) == JSON
    assert content_type_of([("trace", b"x")]) == ""
    assert content_type_of([]) == ""
    assert content_type_of(None) == ""


def test_content_type_header_decides_the_parser() -> None:
    label = Label("s", "a", 1, "ok")
    assert decode(encode(label), content_type_of(headers())) == label
    assert decode(encode_json(label), content_type_of(headers(JSON))) == label
    err = reject(encode_json(label), MSGPACK)  # header says msgpack: parsed as msgpack, not sniffed
    assert err.reason == "undecodable" and "msgpack" in err.detail


# ---------------------------------------------------------------------------- bad input: envelope


@pytest.mark.parametrize("data", [b"\xc1", b"\xc1garbage\x00\xff", b"\x01\x02", b"", b"\x81\xa1"],
                         ids=["never-used-byte", "garbage", "extra-data", "empty", "truncated-map"])
def test_undecodable_msgpack(data: bytes) -> None:
    err = reject(data, MSGPACK)
    assert err.reason == "undecodable"
    assert "not valid msgpack" in err.detail


@pytest.mark.parametrize("data", [b"{not json", b'{"schema": "sf.label/1",', b"\xff\xfe{}"])
def test_undecodable_json(data: bytes) -> None:
    err = reject(data, JSON)
    assert err.reason == "undecodable"
    assert "not valid JSON" in err.detail


def test_undecodable_random_bytes_without_header() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        data = b"\xc1" + rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        assert reject(data).reason == "undecodable"


def test_tombstone_is_undecodable() -> None:
    err = reject(None)  # type: ignore[arg-type]
    assert err.reason == "undecodable" and "tombstone" in err.detail


@pytest.mark.parametrize(
    ("value", "type_name"),
    [([1, 2, 3], "list"), ("sf.label/1", "str"), (42, "int"), (None, "NoneType"), (b"\x00", "bytes")],
)
def test_non_map_value(value, type_name: str) -> None:
    err = reject(msgpack.packb(value, use_bin_type=True), MSGPACK)
    assert err.reason == "undecodable"
    assert f"expected a map, got {type_name}" in err.detail


def test_non_map_json() -> None:
    err = reject(b'["sf.label/1"]', JSON)
    assert err.reason == "undecodable" and "expected a map, got list" in err.detail


@pytest.mark.parametrize("schema", ["sf.nope/9", "sf.sample/2", None, 7])
def test_unknown_schema(schema) -> None:
    raw = raw_map(Label("s", "a", 1, "ok"))
    raw["schema"] = schema
    err = reject(msgpack.packb(raw, use_bin_type=True))
    assert err.reason == "unknown_schema"
    assert repr(schema) in err.detail
    for known in SCHEMAS:  # says what would have been valid
        assert known in err.detail


def test_schema_key_absent() -> None:
    raw = raw_map(Label("s", "a", 1, "ok"))
    del raw["schema"]
    err = reject(msgpack.packb(raw))
    assert err.reason == "unknown_schema" and "None" in err.detail


def test_unexpected_schema() -> None:
    data = encode(Label("s", "a", 1, "ok"))
    err = reject(data, expect=Sample)
    assert err.reason == "unexpected_schema"
    assert "sf.label/1" in err.detail and "sf.sample/1" in err.detail
    err = reject(data, expect=(Sample, Prediction))
    assert err.reason == "unexpected_schema"
    assert "sf.sample/1" in err.detail and "sf.prediction/1" in err.detail
    assert decode(data, expect=(Prediction, Label)) == Label("s", "a", 1, "ok")


@pytest.mark.parametrize("missing", ["sample_id", "asset_id", "ts_ms", "label"])
def test_missing_field_names_it(missing: str) -> None:
    raw = raw_map(Label("s", "a", 1, "ok"))
    del raw[missing]
    for data, ct in ((msgpack.packb(raw), MSGPACK), (json.dumps(raw).encode(), JSON)):
        err = reject(data, ct)
        assert err.reason == "missing_field"
        assert repr(missing) in err.detail and "sf.label/1" in err.detail


def test_required_field_null_is_missing() -> None:
    raw = raw_map(Label("s", "a", 1, "ok"))
    raw["label"] = None
    err = reject(msgpack.packb(raw))
    assert err.reason == "missing_field" and "'label'" in err.detail


def test_null_defaulted_field_takes_default() -> None:
    raw = raw_map(Label("s", "a", 1, "ok", line_id="l"))
    raw["line_id"] = None
    assert decode(msgpack.packb(raw)).line_id == ""


def test_missing_nested_field_gives_its_path() -> None:
    raw = raw_map(sample())
    del raw["readings"]["audio"]["payload"]
    err = reject(msgpack.packb(raw, use_bin_type=True))
    assert err.reason == "missing_field"
    assert "readings.audio.payload" in err.detail


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("ts_ms", "yesterday", "ts_ms: expected an integer, got str"),
        ("ts_ms", 1.5, "ts_ms: expected an integer, got float"),
        ("ts_ms", True, "ts_ms: expected an integer, got bool"),
        ("label", 3, "label: expected a string, got int"),
        ("sample_id", ["s"], "sample_id: expected a string, got list"),
    ],
)
def test_wrong_field_type(field: str, value, expected: str) -> None:
    raw = raw_map(Label("s", "a", 1, "ok"))
    raw[field] = value
    err = reject(msgpack.packb(raw))
    assert err.reason == "bad_field"
    assert expected in err.detail


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("fused_probs", "0.7,0.3", "fused_probs: expected a list, got str"),
        ("fused_probs", [0.5, "x"], "fused_probs[1]: expected a number, got str"),
        ("fused_probs", [True, 0.0], "fused_probs[0]: expected a number, got bool"),
        ("modality_probs", [0.5], "modality_probs: expected a map, got list"),
        ("modality_probs", {"image": [0.1, None]}, "modality_probs.image[1]: expected a number, got NoneType"),
        ("contributions", {"image": "big"}, "contributions.image: expected a number, got str"),
        ("latency_ms", "fast", "latency_ms: expected a number, got str"),
        ("classes", [1, 2], "classes[0]: expected a string, got int"),
    ],
)
def test_wrong_field_type_in_prediction(field: str, value, expected: str) -> None:
    raw = raw_map(next(e for e in EVENTS if isinstance(e, Prediction)))
    raw[field] = value
    err = reject(msgpack.packb(raw))
    assert err.reason == "bad_field"
    assert expected in err.detail


def test_wrong_type_for_bytes_and_nested_event() -> None:
    raw = raw_map(sample())
    raw["readings"]["image"]["payload"] = "not bytes"
    err = reject(msgpack.packb(raw, use_bin_type=True))
    assert err.reason == "bad_field" and "readings.image.payload: expected bytes, got str" in err.detail
    raw = raw_map(sample())
    raw["readings"]["image"] = "a reading"
    err = reject(msgpack.packb(raw, use_bin_type=True))
    assert err.reason == "bad_field" and "readings.image: expected a map, got str" in err.detail


def test_json_payload_not_base64() -> None:
    raw = json.loads(encode_json(image_event()))
    raw["payload"] = "not*base64!"
    err = reject(json.dumps(raw).encode(), JSON)
    assert err.reason == "bad_field" and "payload: not valid base64" in err.detail


def test_oversize() -> None:
    ev = image_event()
    data = encode(ev)
    err = reject(data, max_bytes=len(data) - 1)
    assert err.reason == "oversize"
    assert str(len(data)) in err.detail and str(len(data) - 1) in err.detail
    assert decode(data, max_bytes=len(data)) == ev  # the limit itself is allowed


# ---------------------------------------------------------------------------- bad input: non-finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_float_field_msgpack(bad: float) -> None:
    raw = raw_map(next(e for e in EVENTS if isinstance(e, Prediction)))
    raw["fused_probs"] = [0.5, bad, 0.5]
    err = reject(msgpack.packb(raw))
    assert err.reason == "non_finite"
    assert "fused_probs[1]" in err.detail and str(bad) in err.detail


def test_non_finite_float_field_json() -> None:
    # Python's json writes NaN / Infinity and reads them back: the codec must still refuse.
    raw = json.loads(encode_json(next(e for e in EVENTS if isinstance(e, Prediction))))
    raw["modality_probs"]["audio"] = [0.1, float("inf"), 0.0]
    err = reject(json.dumps(raw).encode(), JSON)
    assert err.reason == "non_finite" and "modality_probs.audio[1]" in err.detail
    raw["modality_probs"]["audio"] = [0.1, 0.2, 0.7]
    raw["latency_ms"] = float("nan")
    err = reject(json.dumps(raw).encode(), JSON)
    assert err.reason == "non_finite" and "latency_ms is nan" in err.detail


def test_non_finite_optional_float_in_kpi() -> None:
    raw = raw_map(KpiSnapshot("global", "", "image", 0, 1, n=1))
    raw["accuracy"] = math.nan
    err = reject(msgpack.packb(raw))
    assert err.reason == "non_finite" and "accuracy" in err.detail


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_series_payload(bad: float) -> None:
    values = np.ones((3, 64), dtype="<f4")
    values[1, 7] = bad
    values[2, 0] = bad
    ev = series_event(values.tobytes())
    err = reject(encode(ev))
    assert err.reason == "non_finite" and err.modality == "series"
    assert "2 NaN/inf" in err.detail


# ---------------------------------------------------------------------------- bad input: payloads


@pytest.mark.parametrize("modality", ["lidar", "IMAGE", "", "video"])
def test_unknown_modality(modality: str) -> None:
    ev = dataclasses.replace(series_event(), modality=modality)
    err = reject(encode(ev))
    assert err.reason == "unknown_modality"
    assert repr(modality) in err.detail
    assert all(m in err.detail for m in MODALITIES)
    assert err.modality == modality


def test_image_random_bytes() -> None:
    payload = np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes()
    payload = b"\x00" + payload  # make sure it cannot start with a JPEG/PNG signature
    err = reject_reading(image_event(payload))
    assert err.reason == "bad_image" and err.modality == "image"
    assert "neither JPEG nor PNG" in err.detail and str(len(payload)) in err.detail


def test_image_jpeg_magic_then_garbage() -> None:
    garbage = np.random.default_rng(4).integers(0, 256, 800, dtype=np.uint8).tobytes()
    err = reject_reading(image_event(b"\xff\xd8\xff" + garbage))
    assert err.reason == "bad_image" and err.modality == "image"
    assert "does not decode" in err.detail


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_image_truncated_jpeg(keep: float) -> None:
    jpeg = jpeg_bytes(64, 64)
    err = reject_reading(image_event(jpeg[: int(len(jpeg) * keep)]))
    assert err.reason == "bad_image" and "does not decode" in err.detail


def test_image_png_without_data() -> None:
    err = reject_reading(image_event(png_header_only(10, 10), encoding="png"))
    assert err.reason == "bad_image" and "does not decode" in err.detail


def test_image_too_wide() -> None:
    wide = png_bytes(MAX_IMAGE_SIDE + 1, 1)
    err = reject_reading(image_event(wide, encoding="png"))
    assert err.reason == "bad_image"
    assert f"{MAX_IMAGE_SIDE + 1}x1" in err.detail and str(MAX_IMAGE_SIDE) in err.detail
    check_reading(image_event(png_bytes(MAX_IMAGE_SIDE, 1), encoding="png"))  # the limit itself is fine


def test_image_decompression_bomb_is_bad_image() -> None:
    bomb = png_header_only(20_000, 20_000)  # 57 bytes that claim 400 M pixels
    err = reject_reading(image_event(bomb, encoding="png"))
    assert err.reason == "bad_image"


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}, {"optimize": True},
                                     {"exif": b"Exif\x00\x00" + b"\x00" * 40}],
                         ids=["baseline", "progressive", "444", "optimized", "exif"])
def test_image_size_reads_jpeg_frame_headers(options) -> None:
    pixels = RNG.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", **options)
    assert image_size(buf.getvalue()) == (53, 37)
    assert image_size(png_bytes(21, 9)) == (21, 9)


def test_header_check_without_decoding() -> None:
    """decode=False checks signature and claimed size only; the body is left to the one
    batch decode that follows (which sets aside what fails there)."""
    for good in (jpeg_bytes(64, 48), png_bytes(8, 8)):
        check_reading(image_event(good), decode=False)
    truncated = jpeg_bytes(64, 64)[:400]
    check_reading(image_event(truncated), decode=False)  # headers are intact
    assert reject_reading(image_event(truncated)).reason == "bad_image"  # a full check decodes
    for bad, words in [(b"\x00" + jpeg_bytes(), "neither JPEG nor PNG"),
                       (b"\xff\xd8\xff" + bytes(50), "no frame header"),
                       (png_header_only(20_000, 20_000), "20000x20000 outside")]:
        with pytest.raises(InvalidEvent, match=words) as err:
            check_reading(image_event(bad), decode=False)
        assert err.value.reason == "bad_image" and err.value.modality == "image"
    fixed, errors = split_bad_readings(sample(image=image_event(b"\x00junk"), series=series_event()), decode=False)
    assert fixed.missing == ("image",) and [e.reason for e in errors] == ["bad_image"]


@pytest.mark.parametrize("rate", [0, 100, 999, 384_001, 10_000_000, None])
def test_audio_impossible_sample_rate(rate) -> None:
    err = reject_reading(audio_event(sample_rate=rate))
    assert err.reason == "bad_audio" and err.modality == "audio"
    assert f"sample_rate {rate}" in err.detail and "1000..384000" in err.detail


@pytest.mark.parametrize("rate", [1_000, 8_000, 44_100, 384_000])
def test_audio_possible_sample_rate(rate: int) -> None:
    check_reading(audio_event(sample_rate=rate))


def test_audio_odd_byte_count() -> None:
    err = reject_reading(audio_event(pcm16(100) + b"\x01"))
    assert err.reason == "bad_audio"
    assert "201 bytes" in err.detail and "1-channel PCM16" in err.detail


def test_audio_partial_stereo_frame_and_empty() -> None:
    err = reject_reading(audio_event(pcm16(100, channels=2) + b"\x00\x00", channels=2))
    assert err.reason == "bad_audio" and "2-channel" in err.detail
    assert reject_reading(audio_event(b"")).reason == "bad_audio"


@pytest.mark.parametrize("channels", [0, 33, -1])
def test_audio_bad_channels(channels: int) -> None:
    err = reject_reading(audio_event(channels=channels))
    assert err.reason == "bad_audio" and f"channels {channels}" in err.detail


def test_audio_bad_encoding() -> None:
    err = reject_reading(audio_event(encoding="mp3"))
    assert err.reason == "bad_audio" and "'mp3'" in err.detail and "pcm16le" in err.detail


@pytest.mark.parametrize(("shape", "shown"), [((2, 4), "[2, 4]"), ((192, 0), "[192, 0]"), ((-3, -64), "[-3, -64]"),
                                              ((193,), "[193]")])
def test_series_shape_mismatch(shape, shown: str) -> None:
    err = reject_reading(series_event(shape=shape))
    assert err.reason == "bad_series" and err.modality == "series"
    assert f"shape {shown} does not match 192 values" in err.detail


def test_series_shape_variants_that_match() -> None:
    check_reading(series_event(shape=(192,)))
    check_reading(series_event(shape=(2, 3, 32)))
    check_reading(series_event(shape=None))


def test_series_not_float32_sized() -> None:
    err = reject_reading(series_event(float32([1, 2, 3]) + b"\x00\x00", shape=None))
    assert err.reason == "bad_series" and "14 bytes" in err.detail
    assert reject_reading(series_event(b"", shape=None)).reason == "bad_series"
    err = reject_reading(series_event(encoding="float64le"))
    assert err.reason == "bad_series" and "float32le" in err.detail


def test_reading_oversize() -> None:
    ev = image_event()
    err = reject_reading(ev, max_bytes=len(ev.payload) - 1)
    assert err.reason == "oversize" and err.modality == "image" and str(len(ev.payload)) in err.detail
    check_reading(ev, max_bytes=len(ev.payload))


# ---------------------------------------------------------------------------- split_bad_readings


def test_split_bad_readings_all_good_returns_same_sample() -> None:
    smp = sample()
    fixed, errors = split_bad_readings(smp)
    assert fixed is smp and errors == []


@pytest.mark.parametrize(
    ("bad_modality", "bad_reading", "reason"),
    [
        ("image", image_event(b"\xff\xd8\xffgarbage"), "bad_image"),
        ("audio", audio_event(sample_rate=100), "bad_audio"),
        ("series", series_event(float32([1.0, float("nan"), 3.0]), shape=(3,)), "non_finite"),
    ],
)
def test_split_bad_readings_one_bad(bad_modality: str, bad_reading: SensorEvent, reason: str) -> None:
    good = {"image": image_event(), "audio": audio_event(), "series": series_event()}
    readings = {**good, bad_modality: bad_reading}
    smp = sample(**readings)
    fixed, errors = split_bad_readings(smp)
    assert set(fixed.readings) == set(MODALITIES) - {bad_modality}
    for m, ev in fixed.readings.items():
        assert ev is readings[m]  # the good readings are untouched
    assert fixed.missing == (bad_modality,)
    assert len(errors) == 1
    assert errors[0].reason == reason and errors[0].modality == bad_modality
    assert (fixed.sample_id, fixed.asset_id, fixed.ts_ms, fixed.line_id) == (
        smp.sample_id, smp.asset_id, smp.ts_ms, smp.line_id)
    assert smp.readings[bad_modality] is bad_reading  # the input sample is not mutated


def test_split_bad_readings_merges_missing_sorted() -> None:
    smp = dataclasses.replace(
        sample(image=image_event(b"junk"), series=series_event()), missing=("audio",)
    )
    fixed, errors = split_bad_readings(smp)
    assert fixed.missing == ("audio", "image")
    assert list(fixed.readings) == ["series"]
    assert [e.modality for e in errors] == ["image"]


def test_split_bad_readings_all_bad_and_oversize() -> None:
    smp = sample()
    limit = min(len(ev.payload) for ev in smp.readings.values()) - 1
    fixed, errors = split_bad_readings(smp, max_bytes=limit)
    assert fixed.readings == {}
    assert fixed.missing == ("audio", "image", "series")
    assert sorted(e.modality for e in errors) == ["audio", "image", "series"]
    assert {e.reason for e in errors} == {"oversize"}


def test_split_bad_readings_key_and_modality_disagree() -> None:
    smp = sample(image=audio_event(), series=series_event())
    fixed, errors = split_bad_readings(smp)
    assert list(fixed.readings) == ["series"] and fixed.missing == ("image",)
    assert errors[0].reason == "bad_field" and errors[0].modality == "image"
    assert "'image'" in errors[0].detail and "'audio'" in errors[0].detail


def test_split_bad_readings_unknown_modality_key() -> None:
    lidar = dataclasses.replace(series_event(), modality="lidar")
    fixed, errors = split_bad_readings(sample(lidar=lidar, series=series_event()))
    assert list(fixed.readings) == ["series"] and fixed.missing == ("lidar",)
    assert errors[0].reason == "unknown_modality" and errors[0].modality == "lidar"


def test_split_bad_readings_after_json_decode() -> None:
    smp = sample(image=image_event(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), audio=audio_event(), series=series_event())
    decoded = decode(encode_json(smp), JSON, expect=Sample)
    fixed, errors = split_bad_readings(decoded)
    assert fixed.missing == ("image",) and set(fixed.readings) == {"audio", "series"}
    assert errors[0].reason == "bad_image"


# ---------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    ("classes", "fused", "per_modality"),
    [
        (("ok", "bad"), (0.1, 0.2, 0.7), {"image": (0.5, 0.5)}),
        (("ok", "bad"), (0.1, 0.9), {"image": (1.0,)}),
        ((), (), {}),
    ],
    ids=["fused-too-long", "modality-too-short", "no-classes"],
)
def test_prediction_probs_must_match_classes(classes, fused, per_modality) -> None:
    pred = Prediction("s", "a", 1, classes, fused, "bad", "ume", per_modality)
    err = reject(encode(pred))
    assert err.reason == "bad_field"
