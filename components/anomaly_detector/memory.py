"""The detector's memory release is the bus's shared one (:mod:`ipc.memory`)."""

from ipc.memory import Released, release, release_free_memory, rss_mb

__all__ = ["Released", "release", "release_free_memory", "rss_mb"]
