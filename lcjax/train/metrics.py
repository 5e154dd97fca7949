"""Run outputs: `config.json`, `metrics.jsonl` (one JSON object a line), TensorBoard events.

On resume, lines for steps after the restored checkpoint are dropped first, so a
run killed after its last checkpoint and rerun logs every step exactly once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lcjax.train.tensorboard import EventWriter

__all__ = ["MetricsWriter", "read_metrics", "write_run_config"]


def _jsonable(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them readable
  return value


def write_run_config(config, workdir: str) -> None:
  """Writes `workdir/config.json`, the resolved run config, atomically."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
  """All complete lines of a metrics.jsonl (a torn last line from a kill is skipped)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


class MetricsWriter:
  """Appends metrics lines and TensorBoard scalars under `workdir`."""

  def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for row in kept:
        f.write(json.dumps(row) + "\n")
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
    self._tb = None
    if tensorboard:
      # A resumed run drops the old file's events from resume_step + 1 on in TensorBoard.
      purge = resume_step + 1 if resume_step > 0 else None
      self._tb = EventWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)}
      self._tb.scalars(step, scalars)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
