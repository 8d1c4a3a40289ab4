"""Run-time memory of a ``knn`` model: what the detector has seen since it loaded the model.

Why. A model fitted once can only say "unlike the training data". On a machine whose normal changes
(a new operating point, a season, a replaced part) that turns one change into an alarm that lasts as
long as the new normal does. A nearest-neighbour model can learn without retraining: every scored
window is remembered, and the next window's score is its distance to the nearest training prototype
or remembered window. A change is then novel when it starts; once it has been seen for a while it is
normal again, which is what an operator means by "anomaly" in a stream. Repetition is what makes a
pattern normal: a one-off excursion becomes a single remembered point that a later, different
excursion is still far from.

Three rules keep it honest and bounded:

- A window enters the memory only after ``exclude_windows`` newer windows have been scored: windows
  that overlap share samples and would be each other's nearest neighbours, hiding any change that
  lasts longer than a window.
- A window closer than ``merge_radius`` to a remembered one is not stored (the memory keeps the
  resolution of the typical neighbour spacing, not every near-duplicate of a steady state). This is
  a second search, against the memory as it is when the window leaves the queue (its overlapping
  predecessors may be in it by then, which is right for thinning: they are near states too); the
  search at scoring time saw an older memory and cannot stand in for it.
- At ``capacity`` the oldest entries are overwritten (a ring): memory and time per window stay bounded
  on a device that runs for months.

Pure numpy, no I/O, no clock; the detector keeps one per asset and drops it when the model changes.
Vectors are in the model's standardized units (``LoadedModel.standardize``), the same units as the
ONNX graph's distances, so ``min(model score, memory distance)`` is one consistent score.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

from components.anomaly.model_card import OnlineSpec


class OnlineMemory:
    def __init__(self, spec: OnlineSpec, n_features: int) -> None:
        self.spec = spec
        self._store = np.zeros((min(spec.capacity, 1024), n_features), dtype=np.float32)
        self._sq = np.zeros(len(self._store), dtype=np.float64)
        self._count = 0  # filled rows (<= capacity)
        self._next = 0  # ring position once full
        self._pending: deque[npt.NDArray[np.float32]] = deque()
        self.stored = 0
        self.merged = 0

    def __len__(self) -> int:
        return self._count

    def distance(self, z: npt.NDArray[np.float32]) -> float:
        """Distance from ``z`` (F,) to the nearest remembered window; inf when the memory is empty."""
        return self.nearest(z)[0]

    def nearest(self, z: npt.NDArray[np.float32]) -> tuple[float, npt.NDArray[np.float64] | None]:
        """(distance, z - that window) for the nearest remembered window; (inf, None) when empty."""
        if self._count == 0:
            return float("inf"), None
        mem = self._store[: self._count]
        # |m|^2 - 2 m.z (|z|^2 is the same for all) with the product in float32: a float64 product would
        # first copy the whole memory to float64 (9x slower at 20,000 x 44). Only the argmin uses it;
        # the distance returned is recomputed exactly for the one found (see onnx_export.knn).
        partial = self._sq[: self._count] - 2.0 * (mem @ np.asarray(z, dtype=np.float32))
        i = int(np.argmin(partial))
        diff = z.astype(np.float64) - mem[i].astype(np.float64)
        return float(np.sqrt(diff @ diff)), diff

    def observe(self, z: npt.NDArray[np.float32]) -> None:
        """Queue a scored window; the one ``exclude_windows`` older leaves the queue for the memory."""
        self._pending.append(np.asarray(z, dtype=np.float32).copy())
        while len(self._pending) > self.spec.exclude_windows:
            self._remember(self._pending.popleft())

    def _remember(self, z: npt.NDArray[np.float32]) -> None:
        if self.spec.merge_radius > 0 and self.distance(z) <= self.spec.merge_radius:
            self.merged += 1
            return
        if self._count < self.spec.capacity:
            if self._count == len(self._store):  # grow geometrically up to capacity
                size = min(self.spec.capacity, 2 * len(self._store))
                self._store = np.resize(self._store, (size, self._store.shape[1]))
                self._sq = np.resize(self._sq, size)
            row = self._count
            self._count += 1
        else:
            row = self._next
            self._next = (self._next + 1) % self.spec.capacity
        self._store[row] = z
        self._sq[row] = float(z.astype(np.float64) @ z.astype(np.float64))
        self.stored += 1

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        """The memory as arrays (copies), for the detector to keep across restarts."""
        pending = np.stack(list(self._pending)) if self._pending else np.zeros((0, self._store.shape[1]), np.float32)
        return {"store": self._store[: self._count].copy(), "next": np.array(self._next, dtype=np.int64),
                "pending": pending, "counts": np.array([self.stored, self.merged], dtype=np.int64)}

    def restore(self, snap: dict[str, npt.NDArray[np.generic]]) -> bool:
        """Take over a snapshot of a memory with the same width; False (and unchanged) if it does not fit."""
        raw = [np.asarray(snap[k]) for k in ("store", "pending", "next", "counts")]
        # A file of another kind (text arrays, NaN rows, a non-scalar position) is not this memory: before,
        # text raised out of the scoring loop and stopped the detector, and a NaN row made every later
        # score NaN.
        if any(a.dtype.kind not in "iuf" for a in raw) or not all(np.isfinite(a).all() for a in raw[:2]):
            return False
        if raw[2].size != 1 or raw[3].size < 2:
            return False
        store, pending = raw[0].astype(np.float32), raw[1].astype(np.float32)
        width = self._store.shape[1]
        if store.ndim != 2 or store.shape[1] != width or pending.ndim != 2 or pending.shape[1] != width:
            return False
        store = store[-self.spec.capacity:]
        self._store = np.zeros((max(len(store), min(self.spec.capacity, 1024)), width), dtype=np.float32)
        self._store[: len(store)] = store
        self._sq = np.zeros(len(self._store), dtype=np.float64)
        self._sq[: len(store)] = (store.astype(np.float64) ** 2).sum(axis=1)
        self._count = len(store)
        self._next = int(snap["next"]) % self.spec.capacity if self._count == self.spec.capacity else 0
        self._pending = deque(pending[-self.spec.exclude_windows:] if self.spec.exclude_windows else pending[:0])
        self.stored, self.merged = (int(v) for v in np.asarray(snap["counts"]).reshape(-1)[:2])
        return True
