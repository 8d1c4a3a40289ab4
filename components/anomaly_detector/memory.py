"""The detector's memory release is the bus's shared one (:mod:`ipc.memory`)."""

from ipc.memory import Released, release, rss_mb

__all__ = ["Released", "release", "rss_mb"]
