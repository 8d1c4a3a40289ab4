"""The batch published on ``sensors/<asset>/raw`` and the per-asset sequence numbering.

One owner for the wire shape, so the simulator, the replay and the MQTT source cannot disagree
on it: channel-major float32, ``t0`` in epoch seconds of the first sample, and a sequence number
that grows by exactly one per published batch so a consumer can tell loss from silence (and
``follows_gap: true`` on a batch whose samples do not continue the previous batch's). ``stream``
names this run of the numbering (new at every ingest start): a restarted ingest counts from 0 again,
and without it a consumer would take the new stream for old, out-of-order batches.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Source = Literal["sim", "csv", "mqtt"]


@dataclass(slots=True, frozen=True)
class Batch:
    """Samples of every channel over the same instants (before a sequence number is given)."""

    t0: float
    rate_hz: float
    channels: tuple[str, ...]
    data: npt.NDArray[np.float32]  # (n_channels, n_samples)
    # Samples are missing between the previous batch and this one although ``seq`` will be consecutive
    # (the source saw a time jump: lost MQTT messages, a gap in a CSV, a replay starting over). A
    # consumer must not join the two into one window.
    follows_gap: bool = False

    @property
    def n_samples(self) -> int:
        return int(self.data.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.rate_hz


@dataclass(slots=True)
class Sequencer:
    """Numbers batches per asset; the only place ``seq`` is incremented."""

    asset: str
    source: Source
    next_seq: int = 0
    stream: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    _gap_pending: bool = False  # the next batch follows a restart of the source (mark_gap)

    def mark_gap(self) -> None:
        """The next batch, whatever its source says, does not continue the last one published (the
        source was restarted by a configuration change while the numbering carries on)."""
        if self.next_seq > 0:
            self._gap_pending = True

    def payload(self, batch: Batch) -> dict[str, Any]:
        data = batch.data
        if data.dtype != np.float32 or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim != 2 or data.shape[0] != len(batch.channels):
            raise ValueError(f"batch data has shape {data.shape}, expected ({len(batch.channels)}, n)")
        seq = self.next_seq
        self.next_seq += 1
        follows_gap = batch.follows_gap or self._gap_pending
        self._gap_pending = False
        return {
            "asset": self.asset,
            "seq": seq,
            "stream": self.stream,
            "t0": float(batch.t0),
            "rate_hz": float(batch.rate_hz),
            "channels": list(batch.channels),
            "data": data,
            "source": self.source,
            **({"follows_gap": True} if follows_gap else {}),
        }
