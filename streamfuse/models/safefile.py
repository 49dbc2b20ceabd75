"""Refuse anything but an intact safetensors file, before any tensor is read. No torch.

Pickle checkpoints (``torch.save``, ``.pt``/``.bin``/``.pkl``) can run code when loaded,
so they are recognized by their first bytes and refused; a truncated copy is recognized
by comparing the file's size with what its header describes. The errors name the file
and the problem.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamfuse.errors import ModelError

__all__ = ["check_shapes", "inspect_safetensors"]

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_CONVERT = "convert it with `safetensors.torch.save_file(torch.load(f, weights_only=True), out)` on a trusted machine"


def _is_pickle(head: bytes) -> str | None:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle file (torch.save legacy format)"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's default format, which holds a pickle)"
    return None


def inspect_safetensors(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares, after checking it is whole.

    Args:
        path: the file.

    Returns:
        name -> ``{"dtype": str, "shape": list[int]}`` (without ``__metadata__``).

    Raises:
        ModelError: the file is missing, a pickle, not safetensors, or truncated; the
            error's ``path`` is the file.

    Examples:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> f = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file({"w": torch.zeros(2, 3)}, f)
        >>> inspect_safetensors(f)
        {'w': {'dtype': 'F32', 'shape': [2, 3]}}
        >>> _ = f.write_bytes(f.read_bytes()[:-4])
        >>> inspect_safetensors(f)
        Traceback (most recent call last):
        ...
        streamfuse.errors.ModelError: ...w.safetensors is truncated: ...
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} is missing; re-import the bundle it came from", path)
    size = path.stat().st_size
    n, header = _read_header(path, size)
    tensors, end = _tensor_table(path, header)
    if 8 + n + end > size:
        raise ModelError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}; "
                         "copy it again from its source", path)
    return tensors


def _read_header(path: Path, size: int) -> tuple[int, Any]:
    """The header's length and its parsed JSON, after refusing a pickle, a file too short
    for a header, and a header length that no safetensors file has or that the ``size``
    bytes cannot hold."""
    with path.open("rb") as f:
        head = f.read(8)
        kind = _is_pickle(head)
        if kind:
            raise ModelError(f"{path} is {kind}, not safetensors; pickles are never loaded "
                             f"(they can run code); {_CONVERT}", path)
        if len(head) < 8:
            raise ModelError(f"{path} is truncated: {size} bytes, shorter than a safetensors header; "
                             "copy it again from its source", path)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ModelError(f"{path} is not a safetensors file (its first 8 bytes are no header length); "
                             f"{_CONVERT}", path)
        if 8 + n > size:
            raise ModelError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}; "
                             "copy it again from its source", path)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not a safetensors file: unreadable header ({exc}); {_CONVERT}", path) from None
    return n, header


def _tensor_table(path: Path, header: Any) -> tuple[dict[str, dict[str, Any]], int]:
    """name -> dtype and shape of every tensor a header declares, and the end of the last
    one's data (relative to the data section)."""
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file: its header is not a map", path)
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            tensors[name] = {"dtype": str(info["dtype"]), "shape": [int(d) for d in info["shape"]]}
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path} is not a safetensors file: bad header entry {name!r}", path) from None
        end = max(end, int(hi))
    return tensors, end


def check_shapes(
    path: Path, declared: Mapping[str, Any], found: Mapping[str, Mapping[str, Any]], where: Path
) -> None:
    """Compare the tensor shapes a manifest declares with those of a weights file.

    Args:
        path: the weights file (for the message).
        declared: name -> ``{"shape": [...], "dtype": ...}`` from the manifest at ``where``.
        found: the same, from :func:`inspect_safetensors`.
        where: the manifest.

    Raises:
        ModelError: naming both files and the first difference.
    """
    missing = sorted(set(declared) - set(found))
    extra = sorted(set(found) - set(declared))
    if missing or extra:
        raise ModelError(f"{where} does not match {path}: tensors missing from the weights {missing[:3]}, "
                         f"not in the manifest {extra[:3]}; re-import the bundle", where)
    for name, want in declared.items():
        got = found[name]
        if list(want.get("shape", [])) != got["shape"] or want.get("dtype", got["dtype"]) != got["dtype"]:
            raise ModelError(f"{where} does not match {path}: tensor {name!r} is {got['dtype']} {got['shape']} in "
                             f"the weights but {want.get('dtype')} {want.get('shape')} in the manifest; "
                             "re-import the bundle", where)
