"""The local IPC bus: wire-independent core, native Unix-socket server, and the component SDK.

Components import only this package (``from ipc import Client``); the nucleus builds an
:class:`ipc.core.IpcCore` and an :class:`ipc.server.IpcServer`. Nothing here imports the nucleus.
"""

from ipc.client import Client, CloudMessage, Message, SyncClient, SyncSubscription, run_component
from ipc.errors import (
    Conflict,
    ConnectionClosed,
    FrameTooLarge,
    InvalidArguments,
    IpcError,
    LimitExceeded,
    ProtocolError,
    ResourceNotFound,
    ServiceError,
    Timeout,
    Unauthenticated,
    Unauthorized,
    UnknownOperation,
)

__all__ = [
    "Client",
    "CloudMessage",
    "Conflict",
    "ConnectionClosed",
    "FrameTooLarge",
    "InvalidArguments",
    "IpcError",
    "LimitExceeded",
    "Message",
    "ProtocolError",
    "ResourceNotFound",
    "ServiceError",
    "SyncClient",
    "SyncSubscription",
    "Timeout",
    "Unauthenticated",
    "Unauthorized",
    "UnknownOperation",
    "run_component",
]
