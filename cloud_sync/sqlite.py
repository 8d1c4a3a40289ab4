"""sqlite-utils, imported without its optional numpy/pandas column-type support.

sqlite-utils imports numpy (and pandas, if present) at import time only to map their scalar
types to SQLite column types. The daemon never stores arrays, and numpy alone costs about
20 MB of resident memory. cloud_sync must not import ``nucleus`` (the dependency runs the other
way), so the trick lives here too; the hidden entries are removed right after the import so a
later ``import numpy`` in this process still works.
"""

from __future__ import annotations

import sys
from types import ModuleType


def _import_without_optional_types() -> ModuleType:
    hidden = [name for name in ("numpy", "pandas") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        import sqlite_utils
    finally:
        for name in hidden:
            if sys.modules.get(name) is None:
                del sys.modules[name]
    return sqlite_utils


sqlite_utils = _import_without_optional_types()
Database = sqlite_utils.Database
