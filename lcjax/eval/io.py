"""Writing evaluation outputs (`WORKDIR/eval/*.json`) so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

__all__ = ["write_json"]


def _default(obj: Any) -> Any:
  """JSON encoding for numpy and jax values (scalars become numbers, arrays lists)."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON serializable; convert it to a list or number")


def write_json(path: str | os.PathLike, obj: Any) -> str:
  """Writes `obj` as JSON atomically: a temporary file in the same folder, then rename.

  Parent folders are created. Readers see either the previous file or the whole
  new one, never a partial write. Returns the path written.
  """
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, default=_default)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
