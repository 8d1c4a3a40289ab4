"""Record sensor batches from the bus into a training recording (the ``.npz`` that ``build`` reads).

Healthy data for a model often exists only as the live stream: this subscribes to a sensor topic
through the SDK (as any declared client or the nucleus CLI), keeps batches in arrival order, and
starts a new segment wherever the sequence numbers show a gap (or the batch says it follows one:
``follows_gap``) or the channels/rate change, so
that no training window ever spans missing data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from components.anomaly.errors import TrainingError
from components.model_builder.data import save_recording
from ipc import Client
from ipc.errors import ConnectionClosed, IpcError, Unauthenticated


@dataclass(slots=True)
class Recorder:
    """Pure accumulation of batches (tested without a bus)."""

    channels: list[str] = field(default_factory=list)
    rate_hz: float | None = None
    chunks: list[npt.NDArray[np.float32]] = field(default_factory=list)
    segment_starts: list[int] = field(default_factory=lambda: [0])
    segment_t0: list[float] = field(default_factory=list)  # epoch time of each segment's first sample
    samples: int = 0
    batches: int = 0
    gaps: int = 0
    # batches dropped because their seq was not after the last one of the same stream: a duplicate or a
    # late batch is no new data (they were recorded, as a new segment, counted as a gap)
    duplicates: int = 0
    asset: str | None = None
    _last_seq: int | None = None
    _last_stream: str | None = None
    _last_t0: float | None = None

    def add(self, payload: Any) -> None:
        try:
            channels = [str(c) for c in payload["channels"]]
            data = np.asarray(payload["data"], dtype=np.float32)
            rate = float(payload["rate_hz"])
            seq = int(payload["seq"])
            t0 = float(payload.get("t0", "nan"))
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"not a sensor batch: {exc}", field="payload") from exc
        if data.ndim != 2 or data.shape[0] != len(channels):
            raise TrainingError(f"batch data shape {data.shape} does not match {len(channels)} channels",
                                field="data")
        asset = payload.get("asset")
        asset = str(asset) if asset is not None else None
        if self.batches and asset != self.asset:
            # a wildcard topic (sensors/+/raw) interleaves assets: each one's batches looked like gaps in
            # the other's, and the recording would mix two machines
            raise TrainingError(f"batches of asset {asset!r} after {self.asset!r}: record one asset's topic "
                                "(sensors/<asset>/raw)", field="topic")
        stream = payload.get("stream")
        stream = str(stream) if stream is not None else None
        restarted = (stream != self._last_stream if stream is not None and self._last_stream is not None
                     else self._last_t0 is not None and t0 > self._last_t0)
        if self._last_seq is not None and seq <= self._last_seq and not restarted:
            self.duplicates += 1
            return
        self._last_stream, self._last_t0 = stream, t0
        if not self.channels:
            self.channels, self.rate_hz, self.asset = channels, rate, asset
        elif channels != self.channels or rate != self.rate_hz:
            raise TrainingError(f"channels/rate changed from {self.channels}@{self.rate_hz} to {channels}@{rate}; "
                                "record one configuration at a time", field="channels")
        if (self._last_seq is not None and (seq != self._last_seq + 1 or payload.get("follows_gap") is True)
                and self.samples):
            self.gaps += 1
            self.segment_starts.append(self.samples)
        if len(self.segment_t0) < len(self.segment_starts):
            self.segment_t0.append(t0)
        self._last_seq = seq
        self.chunks.append(data)
        self.samples += data.shape[1]
        self.batches += 1

    def save(self, out: Path) -> None:
        if not self.chunks:
            raise TrainingError("no batches were recorded", path=out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_recording(out, self.channels, np.concatenate(self.chunks, axis=1), self.rate_hz,
                       self.segment_starts, segment_t0=self.segment_t0)


async def record(socket: Path, token: str, topic: str, out: Path, *, seconds: float | None,
                 batches: int | None) -> Recorder:
    """Record until ``seconds`` have passed or ``batches`` were received, whichever comes first.

    Bus failures are TrainingErrors (one line for the CLI) naming what failed: nothing answering on
    ``socket``, a refused token or subscription, a connection lost while recording (nothing is written)."""
    rec = Recorder()
    deadline = time.monotonic() + seconds if seconds else None
    async with contextlib.AsyncExitStack() as stack:
        client = Client(socket, token, name="nucleus-model-record")
        try:
            await stack.enter_async_context(client)
        except ConnectionClosed as exc:
            raise TrainingError(exc.message, field="socket") from exc
        except Unauthenticated as exc:
            raise TrainingError(f"the daemon refused the IPC token: {exc.message}", path=socket,
                                field="token") from exc
        except IpcError as exc:
            raise TrainingError(f"cannot connect: {exc}", path=socket, field="socket") from exc
        try:
            messages = await stack.enter_async_context(client.subscribe(topic, queue_size=4096, policy="block"))
        except IpcError as exc:
            raise TrainingError(f"cannot subscribe to {topic}: {exc}", field="topic") from exc
        print(f"recording {topic} -> {out}", flush=True)
        while batches is None or rec.batches < batches:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    message = await anext(messages)
            except TimeoutError:
                break
            except (IpcError, StopAsyncIteration) as exc:
                why = f": {exc}" if isinstance(exc, IpcError) else ""
                raise TrainingError(f"the bus connection closed after {rec.batches} batches{why}; nothing was "
                                    "written", path=out) from exc
            rec.add(message.payload)
    rec.save(out)
    return rec
