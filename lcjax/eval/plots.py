"""Evaluation figures: perplexity vs. context length and the passkey depth × length heatmap.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global
backend switch, no display needed), so plotting works in scripts, tests and
headless TPU hosts alike. The heatmap follows the usual needle-in-a-haystack
figure (gkamradt NIAH, LWM): needle depth on the y axis, context length on the
x axis, accuracy in every cell.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn: ~0.3 s of start-up
  from matplotlib.figure import Figure

__all__ = ["plot_ppl_vs_length", "plot_passkey_heatmap"]


def _save(fig: Figure, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path


def plot_ppl_vs_length(
  results: Mapping[str, Sequence[Mapping]],
  path: str | os.PathLike,
  *,
  train_len: int | None = None,
  title: str = "Perplexity vs. context length",
) -> str:
  """One line per variant: perplexity against context length (log2 x axis).

  Args:
    results: variant name (e.g. RoPE type) -> `perplexity_vs_length` output, i.e.
      dicts with `context_len` and `ppl`.
    path: PNG file to write; parent folders are created.
    train_len: draws a dashed vertical line at the training context length.
    title: figure title.

  Returns:
    the path written.
  """
  if not results:
    raise ValueError("results is empty; pass {variant name: perplexity_vs_length(...)}")
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  all_ppl = []
  for name, rows in results.items():
    rows = sorted(rows, key=lambda row: row["context_len"])
    x = [row["context_len"] for row in rows]
    y = [row["ppl"] for row in rows]
    all_ppl += y
    ax.plot(x, y, marker="o", label=name)
  if train_len is not None:
    ax.axvline(train_len, color="gray", linestyle="--", label=f"train length {train_len}")
  ax.set_xscale("log", base=2)
  finite = [p for p in all_ppl if np.isfinite(p) and p > 0]
  if finite and max(finite) / min(finite) > 10:  # exploding extrapolation: log y
    ax.set_yscale("log")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("perplexity")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_passkey_heatmap(
  grid: Sequence[Sequence[float]],
  lengths: Sequence[int],
  depths: Sequence[float],
  path: str | os.PathLike,
  *,
  title: str = "Passkey retrieval accuracy",
) -> str:
  """Accuracy heatmap with depth rows and length columns, values in the cells.

  Args:
    grid: accuracies indexed [length][depth], as `passkey_accuracy` returns them.
    lengths: context lengths (columns).
    depths: needle depths in [0, 1] (rows, 0 at the top).
    path: PNG file to write; parent folders are created.
    title: figure title.

  Returns:
    the path written.
  """
  acc_LD = np.asarray(grid, np.float64)
  if acc_LD.shape != (len(lengths), len(depths)):
    raise ValueError(
      f"grid has shape {acc_LD.shape} but lengths × depths is {(len(lengths), len(depths))}; "
      "pass the grid indexed [length][depth]"
    )
  acc_DL = acc_LD.T
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.45 * len(depths)))
  ax = fig.add_subplot()
  image = ax.imshow(acc_DL, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  for d in range(acc_DL.shape[0]):
    for n in range(acc_DL.shape[1]):
      value = acc_DL[d, n]
      color = "black" if 0.25 < value < 0.85 else "white"
      ax.text(n, d, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="accuracy")
  return _save(fig, path)
