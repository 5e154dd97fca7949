"""Gathers a sweep's metrics into `results.csv`, `results.md` and `plots/*.png`.

Each point's row holds the last value of every key of its `metrics.jsonl` that one of
the config's `metrics(arg)` patterns matches (`fnmatch`, e.g. "eval/ppl@*/trained"),
and the numbers of `eval/*.json` files a pattern names (flattened to
"file.json/key/..."). Rows also carry the point's config deltas (its overrides and
what it starts from), so a table says what each number measures.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
import shutil
from typing import Any

from lcjax.sweep.points import point_status
from lcjax.train.metrics import read_metrics

__all__ = ["gather_results", "write_results", "plot_lines", "natural_key"]


def natural_key(text: str) -> list:
  """Sort key that orders "ppl@256" before "ppl@1024" (numbers compared as numbers)."""
  parts = re.split(r"(\d+(?:\.\d+)?)", text)
  return [(1, float(p), "") if i % 2 else (0, 0.0, p) for i, p in enumerate(parts)]


def _last_values(path: str) -> dict[str, Any]:
  values: dict[str, Any] = {}
  for row in read_metrics(path):
    values.update({k: v for k, v in row.items() if k != "step"})
  return values


def _flatten(obj: Any, prefix: str) -> dict[str, float]:
  flat: dict[str, float] = {}
  if isinstance(obj, dict):
    for key, value in obj.items():
      flat.update(_flatten(value, f"{prefix}/{key}"))
  elif isinstance(obj, int | float) and not isinstance(obj, bool):
    flat[prefix] = obj
  return flat


def _point_metrics(point_dir: str, patterns: tuple[str, ...]) -> dict[str, Any]:
  values = _last_values(os.path.join(point_dir, "metrics.jsonl"))
  found = {k: v for k, v in values.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
  for pattern in patterns:
    if not pattern.endswith(".json"):
      continue
    path = os.path.join(point_dir, pattern)  # relative to the point's run folder
    if os.path.exists(path):
      with open(path) as f:
        found.update(_flatten(json.load(f), pattern))
  return found


def gather_results(spec, sweep_dir: str) -> list[dict[str, Any]]:
  """One dict per point (in run order): point, status, after, overrides, then metrics."""
  rows = []
  for point in spec.points:
    overrides = "; ".join(f"{k}={_compact(v)}" for k, v in point.overrides.items())
    row = {
      "point": point.name,
      "status": point_status(sweep_dir, point),
      "after": point.after or "",
      "kind": "eval" if point.eval_only else "train",
      "overrides": overrides,
    }
    row.update(_point_metrics(os.path.join(sweep_dir, point.name), spec.metrics))
    rows.append(row)
  return rows


def _compact(value: Any) -> str:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k}: {_compact(v)}" for k, v in value.items()) + "}"
  return str(value)


_FIXED = ("point", "status", "after", "kind", "overrides")


def _metric_columns(rows: list[dict]) -> list[str]:
  keys = {k for row in rows for k in row if k not in _FIXED}
  return sorted(keys, key=natural_key)


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.3f}"
  return "" if value is None else str(value)


def _short(column: str, columns: list[str]) -> str:
  """Column header without the prefix every metric column shares (e.g. "eval/")."""
  prefix = os.path.commonprefix(columns) if len(columns) > 1 else ""
  prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""
  return column[len(prefix) :] or column


def write_results(spec, sweep_dir: str, rows: list[dict]) -> list[str]:
  """Writes results.csv, results.md and the configured plots; returns the paths."""
  columns = _metric_columns(rows)
  os.makedirs(sweep_dir, exist_ok=True)
  csv_path = os.path.join(sweep_dir, "results.csv")
  with open(csv_path + ".tmp", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["point", "status", "after", "kind", *columns, "overrides"])
    for row in rows:
      values = [row.get(c) for c in columns]
      writer.writerow(
        [row["point"], row["status"], row["after"], row["kind"], *values, row["overrides"]]
      )
  os.replace(csv_path + ".tmp", csv_path)

  md_path = os.path.join(sweep_dir, "results.md")
  head = ["point", *[_short(c, columns) for c in columns], "config deltas"]
  lines = [
    f"Sweep `{spec.spec}` ({sum(r['status'] == 'done' for r in rows)}/{len(rows)} points done)",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "|".join(["---"] + ["---:"] * len(columns) + ["---"]) + "|",
  ]
  for row in rows:
    name = row["point"] + ("" if row["status"] == "done" else f" ({row['status']})")
    deltas = row["overrides"] or "(base)"
    if row["after"]:
      deltas = (
        f"after {row['after']}"
        + ("" if row["kind"] == "train" else ", eval only")
        + (f"; {row['overrides']}" if row["overrides"] else "")
      )
    cells = [name, *[_fmt(row.get(c)) for c in columns], deltas.replace("|", "\\|")]
    lines.append("| " + " | ".join(cells) + " |")
  with open(md_path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(md_path + ".tmp", md_path)

  written = [csv_path, md_path]
  for plot in spec.plots:
    path = plot_lines(rows, plot, os.path.join(sweep_dir, "plots"))
    if path:
      written.append(path)
  written += _collect_point_plots(spec, sweep_dir)
  return written


def _collect_point_plots(spec, sweep_dir: str) -> list[str]:
  """Copies each point's passkey heatmap to plots/passkey_<point>.png (one per method)."""
  copied = []
  for point in spec.points:
    src = os.path.join(sweep_dir, point.name, "plots", "passkey_depth_length.png")
    if os.path.exists(src):
      dst = os.path.join(sweep_dir, "plots", f"passkey_{point.name}.png")
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(src, dst)
      copied.append(dst)
  return copied


def plot_lines(rows: list[dict], plot: dict, plots_dir: str) -> str | None:
  """One line per point: x from the `{x}` of `plot['metric']`, y its value.

  `plot` keys: file, metric (with `{x}`), points (names; default all rows that have the
  metric), title, xlabel, ylabel, logx (default True), logy (default False),
  reference (a y value drawn as a dashed line, e.g. the trained model's 1x ppl).
  """
  import matplotlib  # noqa: PLC0415 - only sweeps that plot need it

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  before, after = plot["metric"].split("{x}")
  pattern = re.compile(re.escape(before) + r"([0-9.]+)" + re.escape(after) + "$")
  wanted = plot.get("points")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = 0
  for row in rows:
    if wanted is not None and row["point"] not in wanted:
      continue
    xy = sorted(
      (float(m.group(1)), v)
      for k, v in row.items()
      if (m := pattern.match(k)) and isinstance(v, int | float)
    )
    if not xy:
      continue
    ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=row["point"])
    drawn += 1
  if not drawn:
    plt.close(fig)
    return None
  if plot.get("logx", True):
    ax.set_xscale("log", base=2)
  if plot.get("logy", False):
    ax.set_yscale("log")
  ax.set_xlabel(plot.get("xlabel", "x"))
  ax.set_ylabel(plot.get("ylabel", plot["metric"].replace("{x}", "x")))
  ax.set_title(plot.get("title", ""))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  os.makedirs(plots_dir, exist_ok=True)
  path = os.path.join(plots_dir, plot["file"])
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
