"""Sliding count windows: the last N rows of a feature matrix, in arrival order."""

from __future__ import annotations

import numpy as np


class SlidingWindow:
    """A ring buffer keeping the most recent `capacity` rows of width `width`."""

    def __init__(self, capacity: int, width: int, dtype: type = np.float64):
        if capacity < 1 or width < 1:
            raise ValueError(f"capacity and width must be positive, got {capacity} and {width}")
        self._buf: np.ndarray = np.zeros((capacity, width), dtype=dtype)
        self._next = 0
        self._count = 0
        self.total = 0                  # rows ever pushed

    @property
    def capacity(self) -> int:
        return int(self._buf.shape[0])

    @property
    def width(self) -> int:
        return int(self._buf.shape[1])

    def __len__(self) -> int:
        return self._count

    def push(self, rows: np.ndarray) -> None:
        """Append rows (K×width); the oldest fall out beyond capacity."""
        r = np.asarray(rows).reshape(-1, self.width)
        if len(r) >= self.capacity:
            self.total += len(r)
            self._buf[:] = r[-self.capacity:]
            self._next, self._count = 0, self.capacity
            return
        end = self._next + len(r)
        if end <= self.capacity:
            self._buf[self._next:end] = r
        else:
            first = self.capacity - self._next
            self._buf[self._next:] = r[:first]
            self._buf[:end - self.capacity] = r[first:]
        self._next = end % self.capacity
        self._count = min(self.capacity, self._count + len(r))
        self.total += len(r)

    def values(self) -> np.ndarray:
        """A copy of the rows held, oldest first."""
        if self._count < self.capacity:
            return self._buf[:self._count].copy()
        return np.concatenate([self._buf[self._next:], self._buf[:self._next]])
