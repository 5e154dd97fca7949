"""Sweeps: configs that define many runs, run in order and gathered into one table.

`lcjax.sweep.points` reads a sweep config's points; `lcjax.sweep.runner` runs them
(`scripts/sweep.py`); `lcjax.sweep.results` writes results.csv / results.md / plots.
"""

from lcjax.sweep.points import Point, SweepSpec, load_sweep
from lcjax.sweep.runner import list_points, print_commands, run_sweep, validate_points

__all__ = [
  "Point",
  "SweepSpec",
  "list_points",
  "load_sweep",
  "print_commands",
  "run_sweep",
  "validate_points",
]
