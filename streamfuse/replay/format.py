"""The recording format: segment files of length-prefixed msgpack records, and a manifest.

A recording is a directory (see ``docs/recording-format.md``)::

    manifest.json
    <topic>/<partition:03d>-<seq:05d>.sfrec[.gz]

``<topic>`` is the topic name without the source's prefix (``samples``,
``sensor.image``...), so a recording replays under any prefix. A segment holds the
records of one topic-partition in offset order: the magic ``SFREC1\\n``, then for each
record a 4-byte big-endian length and a msgpack map ``{key, value, headers, partition,
offset, timestamp_ms, timestamp_type}`` (bytes stay bytes; headers are ``[name, bytes]``
pairs in their original order). ``.gz`` segments are that stream gzip-compressed.

No Kafka here: plain files in, plain dicts out.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import msgpack

from streamfuse.replay.errors import RecordingError

FORMAT = "streamfuse-recording/1"
MAGIC = b"SFREC1\n"
MANIFEST = "manifest.json"
SEGMENT_BYTES = 64 * 1024 * 1024
COMPRESSIONS = ("gzip", "none")
_LEN = struct.Struct(">I")


def record_map(key: bytes | None, value: bytes | None, headers, partition: int, offset: int,
               timestamp_ms: int, timestamp_type: int = 0) -> dict[str, Any]:
    """One record as stored (and as :func:`iter_segment` returns it)."""
    return {"key": key, "value": value, "headers": [[str(k), bytes(v) if v is not None else None]
                                                    for k, v in (headers or [])],
            "partition": int(partition), "offset": int(offset), "timestamp_ms": int(timestamp_ms),
            "timestamp_type": int(timestamp_type or 0)}


class _Segment:
    def __init__(self, root: Path, topic: str, partition: int, seq: int, compression: str) -> None:
        self.rel = f"{topic}/{partition:03d}-{seq:05d}.sfrec" + (".gz" if compression == "gzip" else "")
        self.path = root / self.rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.topic, self.partition, self.compression = topic, partition, compression
        raw = open(self.path, "xb")
        # gzip level 1: payloads are mostly JPEG and PCM; higher levels cost CPU for little.
        self.fh: BinaryIO = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) \
            if compression == "gzip" else raw
        self._raw = raw
        self.fh.write(MAGIC)
        self.records = 0
        self.raw_bytes = len(MAGIC)
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}

    def write(self, rec: dict[str, Any]) -> None:
        body = msgpack.packb(rec, use_bin_type=True)
        self.fh.write(_LEN.pack(len(body)))
        self.fh.write(body)
        self.raw_bytes += _LEN.size + len(body)
        mark = {"offset": rec["offset"], "timestamp_ms": rec["timestamp_ms"]}
        if not self.records:
            self.first = mark
        self.last = mark
        self.records += 1

    def close(self) -> dict[str, Any]:
        self.fh.close()
        if self._raw is not self.fh:
            self._raw.close()
        return {"file": self.rel, "topic": self.topic, "partition": self.partition, "records": self.records,
                "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path),
                "compression": self.compression,
                "first_offset": self.first.get("offset"), "last_offset": self.last.get("offset"),
                "first_timestamp_ms": self.first.get("timestamp_ms"),
                "last_timestamp_ms": self.last.get("timestamp_ms")}


class RecordingWriter:
    """Writes segments under ``root``; :meth:`close` writes the manifest.

    Args:
        root: the recording directory; created; must not hold a recording already.
        compression: ``gzip`` (default) or ``none``.
        segment_bytes: a segment is closed and a new one started past this many
            uncompressed bytes.

    Raises:
        RecordingError: ``root`` already holds a recording, or the compression is unknown.
    """

    def __init__(self, root: str | Path, compression: str = "gzip", segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = Path(root)
        if compression not in COMPRESSIONS:
            raise RecordingError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
        if (self.root / MANIFEST).exists():
            raise RecordingError(f"{self.root} already holds a recording; choose a new --out directory or "
                                 "delete the old one", self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.compression = compression
        self.segment_bytes = segment_bytes
        self._open: dict[tuple[str, int], _Segment] = {}
        self._seq: dict[tuple[str, int], int] = {}
        self.segments: list[dict[str, Any]] = []

    def add(self, topic: str, rec: dict[str, Any]) -> None:
        """Append one record (a :func:`record_map`) of ``topic`` (name without prefix)."""
        k = (topic, rec["partition"])
        seg = self._open.get(k)
        if seg is None:
            seq = self._seq[k] = self._seq.get(k, -1) + 1
            try:
                seg = self._open[k] = _Segment(self.root, topic, rec["partition"], seq, self.compression)
            except FileExistsError:
                raise RecordingError(f"segment {topic}/{rec['partition']} #{seq} exists in {self.root}; "
                                     "record into an empty directory", self.root) from None
        seg.write(rec)
        if seg.raw_bytes >= self.segment_bytes:
            self.segments.append(self._open.pop(k).close())

    def close(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Close every segment and write ``manifest.json`` (``manifest`` plus the segment list).

        Returns:
            The manifest as written.
        """
        for seg in self._open.values():
            self.segments.append(seg.close())
        self._open.clear()
        out = {"format": FORMAT, **manifest,
               "segments": sorted(self.segments, key=lambda s: (s["topic"], s["partition"], s["file"]))}
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(out, indent=2, sort_keys=False))
        tmp.replace(self.root / MANIFEST)  # the manifest appears complete or not at all
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def iter_segment(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of one segment file, in offset order.

    Raises:
        RecordingError: not a segment file, or truncated.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                raise RecordingError(f"{path} is not a streamfuse segment (bad magic); is this a recording "
                                     "directory written by `streamfuse record`?", path)
            while True:
                head = fh.read(_LEN.size)
                if not head:
                    return
                if len(head) < _LEN.size:
                    raise EOFError("length prefix cut short")
                (n,) = _LEN.unpack(head)
                body = fh.read(n)
                if len(body) < n:
                    raise EOFError(f"record of {n} bytes cut short at {len(body)}")
                yield msgpack.unpackb(body, raw=False)
    except (EOFError, OSError, ValueError, msgpack.UnpackException) as exc:
        raise RecordingError(f"segment {path} is truncated or corrupt ({exc}); re-record, or restore the "
                             "file from a copy", path) from None


class Recording:
    """A recording directory, opened read-only.

    Args:
        root: the directory holding ``manifest.json``.
        verify: check every segment's size and SHA-256 against the manifest first.

    Raises:
        RecordingError: no manifest, another format, a missing or modified segment.
    """

    def __init__(self, root: str | Path, verify: bool = True) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise RecordingError(f"no {MANIFEST} in {self.root}: not a recording (make one with "
                                 "`streamfuse record --out DIR`), or the recorder did not finish", self.root)
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except ValueError as exc:
            raise RecordingError(f"{path} is not valid JSON ({exc}); the recording is damaged", path) from None
        if self.manifest.get("format") != FORMAT:
            raise RecordingError(f"{path} has format {self.manifest.get('format')!r}; this streamfuse reads "
                                 f"{FORMAT!r}", path)
        if self.manifest.get("incomplete"):
            raise RecordingError(f"{path} belongs to a recording that stopped with an error; its segments "
                                 "hold what was read until then: record again", path)
        if verify:
            self.verify()

    def verify(self) -> None:
        """Raises RecordingError naming the first segment whose size or SHA-256 differs."""
        for seg in self.manifest["segments"]:
            p = self.root / seg["file"]
            if not p.is_file():
                raise RecordingError(f"segment {p} listed in the manifest is missing; restore it, or re-record",
                                     p)
            if p.stat().st_size != seg["bytes"] or sha256_file(p) != seg["sha256"]:
                raise RecordingError(f"segment {p} does not match its SHA-256 in the manifest (modified or "
                                     "damaged); restore it, or re-record", p)

    @property
    def topics(self) -> dict[str, dict[str, Any]]:
        """topic (without prefix) -> its manifest entry (partitions, records, time range)."""
        return self.manifest.get("topics", {})

    @property
    def annotations(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("annotations") or [])

    def partitions(self, topic: str) -> list[int]:
        return sorted({s["partition"] for s in self.manifest["segments"] if s["topic"] == topic})

    def records(self, topic: str, partition: int) -> Iterator[dict[str, Any]]:
        """Every record of one topic-partition, in offset order."""
        segs = [s for s in self.manifest["segments"] if s["topic"] == topic and s["partition"] == partition]
        for seg in sorted(segs, key=lambda s: s["file"]):
            yield from iter_segment(self.root / seg["file"])
