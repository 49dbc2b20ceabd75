"""Errors of record and replay. Each carries the path or name at fault and says how to fix it."""

from __future__ import annotations

from pathlib import Path

from streamfuse.errors import StreamfuseError


class RecordingError(StreamfuseError):
    """A recording cannot be written or read: missing, corrupt, or of another format.

    Attributes:
        path: the file or directory at fault.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class ReplayError(StreamfuseError):
    """A replay cannot start or did not complete (bad option, unsafe namespace, a pipeline
    process that died, a deadline passed).

    Attributes:
        namespace: the replay's topic prefix, when one was chosen.
    """

    def __init__(self, message: str, namespace: str | None = None) -> None:
        super().__init__(message)
        self.namespace = namespace
