"""The cloud_sync exception tree; every error carries a stable ``code`` and structured fields.

::

    SyncError
    ├── SpoolError             the spool file cannot be opened, read or written (names the path)
    │   └── SpoolFullError     a message was refused: the spool's bounds (reason="spool_full")
    │                          or the disk (reason="disk_full")
    ├── MessageRejected        bad input from a publisher: oversized, unencodable, bad TTL/priority
    └── LinkError              the broker link: bad URL, refused credentials, TLS files
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SyncError(Exception):
    code = "SYNC_ERROR"

    def __init__(self, message: str, *, path: Path | str | None = None, topic: str | None = None,
                 reason: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.topic = topic
        self.reason = reason
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, **self.fields}
        for key in ("path", "topic", "reason"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class SpoolError(SyncError):
    code = "SPOOL_ERROR"


class SpoolFullError(SpoolError):
    code = "SPOOL_FULL"


class MessageRejected(SyncError):
    code = "MESSAGE_REJECTED"


class LinkError(SyncError):
    code = "LINK_ERROR"
