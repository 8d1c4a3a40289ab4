"""The IPC exception tree, shared by the server, the SDK and every front end.

Codes are stable: they travel in ERROR frames (native protocol) and are mapped to modeled errors by
the Greengrass front end, so a client can react to ``err.code`` without parsing messages. The SDK
re-raises the subclass matching the code it receives (:func:`from_wire`).

::

    IpcError                 (code given at construction; SERVICE_ERROR by default)
    ├── Unauthenticated      UNAUTHENTICATED     missing/unknown token, PID mismatch
    ├── Unauthorized         UNAUTHORIZED        a policy denies operation on resource
    ├── InvalidArguments     INVALID_ARGUMENTS   bad topic, missing field, wrong type
    ├── ResourceNotFound     RESOURCE_NOT_FOUND  unknown component, expired reply handle
    ├── Conflict             CONFLICT            state does not allow the operation now
    ├── Timeout              TIMEOUT             request/reply or call timed out
    ├── ServiceError         SERVICE_ERROR       a handler failed unexpectedly
    ├── UnknownOperation     UNKNOWN_OPERATION   nothing registered under that op name
    ├── LimitExceeded        LIMIT_EXCEEDED      per-session caps (subscriptions, in-flight, connections)
    ├── ProtocolError        PROTOCOL_ERROR      malformed frame, bad handshake, version mismatch
    │   └── FrameTooLarge    FRAME_TOO_LARGE     a frame above the negotiated limit
    └── ConnectionClosed     CONNECTION_CLOSED   the peer went away with calls outstanding
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class IpcError(Exception):
    """Base of every IPC failure; ``code`` is the stable wire code."""

    default_code: ClassVar[str] = "SERVICE_ERROR"

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return self.code, self.message, self.details


class _Coded(IpcError):
    """Subclasses fix their code so call sites only say what went wrong."""

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(self.default_code, message, details)


class Unauthenticated(_Coded):
    default_code = "UNAUTHENTICATED"


class Unauthorized(_Coded):
    default_code = "UNAUTHORIZED"


class InvalidArguments(_Coded):
    default_code = "INVALID_ARGUMENTS"


class ResourceNotFound(_Coded):
    default_code = "RESOURCE_NOT_FOUND"


class Conflict(_Coded):
    default_code = "CONFLICT"


class Timeout(_Coded):
    default_code = "TIMEOUT"


class ServiceError(_Coded):
    default_code = "SERVICE_ERROR"


class UnknownOperation(_Coded):
    default_code = "UNKNOWN_OPERATION"


class LimitExceeded(_Coded):
    default_code = "LIMIT_EXCEEDED"


class ProtocolError(_Coded):
    default_code = "PROTOCOL_ERROR"


class FrameTooLarge(ProtocolError):
    default_code = "FRAME_TOO_LARGE"


class ConnectionClosed(_Coded):
    default_code = "CONNECTION_CLOSED"


_BY_CODE: dict[str, type[_Coded]] = {
    cls.default_code: cls
    for cls in (
        Unauthenticated, Unauthorized, InvalidArguments, ResourceNotFound, Conflict, Timeout,
        ServiceError, UnknownOperation, LimitExceeded, ProtocolError, FrameTooLarge, ConnectionClosed,
    )
}


def from_wire(code: str, message: str, details: Mapping[str, Any] | None = None) -> IpcError:
    """Rebuild the matching subclass from an ERROR frame; unknown codes keep their code on the base."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return IpcError(code, message, details)
    return cls(message, details)
