"""Needle-in-a-haystack heatmaps: needle depth × context length, mean score per cell.

The LWM (`scripts/eval_needle.py`) and gkamradt (LLMTest_NeedleInAHaystack) convention: context
length on the x axis, needle depth (0% = start of the context) on the y axis, the mean score
of the samples of a cell as its value. RULER samples record the depth of the needle that holds
their first answer; a sample counts in the row of the nearest grid depth (the depth grid the
samples were placed at, `eval.ruler.depths`, or evenly spaced bin centres otherwise). Cells
without samples are grey. Drawn on matplotlib's Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lcjax.eval.plots import _save

__all__ = ["default_depth_rows", "depth_length_grid", "plot_niah_heatmap"]


def default_depth_rows(bins: int = 5) -> list[float]:
  """Centres of `bins` equal depth bins over [0, 100] (10, 30, 50, 70, 90 for 5)."""
  return [100.0 * (i + 0.5) / bins for i in range(bins)]


def depth_length_grid(
  records: Sequence[dict], lengths: Sequence[int], depths: Sequence[float], key: str = "score"
) -> tuple[np.ndarray, np.ndarray]:
  """(mean_DL, count_DL): the mean of `key` over records per (nearest depth row, length).

  `records` are per-sample dicts with `length`, `depth` (percent, or None: skipped) and `key`.
  """
  depths_D = np.asarray(depths, np.float64)
  total_DL = np.zeros((len(depths), len(lengths)))
  count_DL = np.zeros((len(depths), len(lengths)), np.int64)
  column = {int(n): j for j, n in enumerate(lengths)}
  for r in records:
    if r.get("depth") is None or r.get(key) is None or int(r["length"]) not in column:
      continue
    d = int(np.argmin(np.abs(depths_D - float(r["depth"]))))
    total_DL[d, column[int(r["length"])]] += float(r[key])
    count_DL[d, column[int(r["length"])]] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_DL = np.where(count_DL > 0, total_DL / np.maximum(count_DL, 1), np.nan)
  return mean_DL, count_DL


def plot_niah_heatmap(
  mean_DL: np.ndarray,
  lengths: Sequence[int],
  depths: Sequence[float],
  path: str | os.PathLike,
  *,
  title: str,
  vmax: float = 100.0,
  label: str = "score",
) -> str:
  """Writes the depth × length heatmap PNG (values 0..vmax, NaN cells grey); returns the path."""
  mean_DL = np.asarray(mean_DL, np.float64)
  if mean_DL.shape != (len(depths), len(lengths)):
    raise ValueError(
      f"grid has shape {mean_DL.shape} but depths × lengths is {(len(depths), len(lengths))}"
    )
  import matplotlib  # noqa: PLC0415 - imported when a figure is drawn (start-up time)
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(1.6 + 0.8 * len(lengths), 1.2 + 0.42 * len(depths)))
  ax = fig.add_subplot()
  cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#bbbbbb")
  image = ax.imshow(np.ma.masked_invalid(mean_DL), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
  for d in range(mean_DL.shape[0]):
    for n in range(mean_DL.shape[1]):
      value = mean_DL[d, n]
      text = "–" if np.isnan(value) else f"{value:.0f}"
      color = "black" if np.isnan(value) or 0.25 * vmax < value < 0.85 * vmax else "white"
      ax.text(n, d, text, ha="center", va="center", color=color, fontsize=8)
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
  ax.set_yticks(range(len(depths)), [f"{d:.0f}%" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label=label)
  return _save(fig, path)
