"""sqlite-utils for the nucleus, imported without its optional numpy/pandas support.

The trick (and why it saves ~20 MB of daemon RSS) lives in :mod:`cloud_sync.sqlite`, the lower
layer; the nucleus re-exports it so both SQLite owners import sqlite-utils the same way.
"""

from cloud_sync.sqlite import Database, sqlite_utils

__all__ = ["Database", "sqlite_utils"]
