"""The points of a sweep config, their locked configs and their order.

A sweep is an ordinary `configs/NAME.py` (big_vision's convention,
e.g. big_vision/configs/proj/paligemma/transfers/*.py) that defines, besides
`get_config(arg)`:

  def sweep(add, arg=None):             # one add() per point
    add("pretrain")
    add("pi4", after="pretrain", eval_only=True, **{"model_overrides.rope": {...}})
    add("pi4_ft", after="pretrain", **{"model_overrides.rope": {...}, "train.steps": 150})

  def metrics(arg=None):                # what results.csv collects from each point
    return ["eval/ppl@*/trained", "eval/passkey@*"]

  def plots(arg=None):                  # optional: line plots over the points
    return [dict(file="ppl_vs_length.png", metric="eval/ppl@{x}/trained", points=[...])]

Overrides are dotted field names of the config (`lcjax.config.apply_overrides`; keys
inside `model_overrides` and `eval.rope_variants` may be new). `after=NAME` makes the
point start from NAME's final checkpoint (`init_from` = that point's run folder); an
`eval_only` point trains nothing: it evaluates the model its config builds (e.g. the
`after` checkpoint under another RoPE).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from ml_collections import config_flags

from lcjax.config import ConfigError, apply_overrides, config_path, load_config, load_module

__all__ = [
  "DONE_FILE",
  "Point",
  "done_record",
  "plain",
  "point_status",
  "SweepSpec",
  "config_for_flags",
  "load_sweep",
  "order_points",
  "point_config",
  "with_dependencies",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: a name (its folder), dotted overrides, what it starts from."""

  name: str
  overrides: Mapping[str, Any]
  after: str | None = None
  eval_only: bool = False


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A loaded sweep config: the spec string, its points in run order, metrics and plots."""

  spec: str
  points: tuple[Point, ...]
  metrics: tuple[str, ...]
  plots: tuple[Mapping[str, Any], ...]
  # The config the points' overrides apply to; None: `get_config` of `spec` (a sweep file).
  # Multi-stage runs (`lcjax.sweep.stages`) pass the run's own config here.
  base: Any = None

  def point(self, name: str) -> Point:
    for point in self.points:
      if point.name == name:
        return point
    raise ConfigError(f"no point {name!r} in {self.spec}; its points are {self.names()}")

  def names(self) -> list[str]:
    return [p.name for p in self.points]


def _collect(sweep_fn: Callable, arg: str | None, where: str) -> list[Point]:
  points: list[Point] = []

  def add(name: str, *, after: str | None = None, eval_only: bool = False, **overrides: Any):
    if not isinstance(name, str) or not _NAME.match(name):
      raise ConfigError(
        f"{where}: point name {name!r} must be letters, digits, '_', '-' or '.' (it is a folder)"
      )
    if any(p.name == name for p in points):
      raise ConfigError(f"{where}: point {name!r} is added twice; point names must be unique")
    if "init_from" in overrides and after is not None:
      raise ConfigError(f"{where}: point {name!r} sets both after= and init_from; choose one")
    points.append(Point(name, dict(overrides), after, bool(eval_only)))

  sweep_fn(add, arg)
  if not points:
    raise ConfigError(f"{where}: sweep() added no point; call add(name, **overrides)")
  return points


def order_points(points: list[Point]) -> list[Point]:
  """Points with every `after` before its dependents (stable: otherwise the config's order)."""
  by_name = {p.name: p for p in points}
  for p in points:
    if p.after is not None and p.after not in by_name:
      known = list(by_name)
      raise ConfigError(f"point {p.name!r}: after={p.after!r} names no point; known: {known}")
  ordered: list[Point] = []
  state: dict[str, str] = {}

  def visit(point: Point, chain: tuple[str, ...]) -> None:
    if state.get(point.name) == "done":
      return
    if state.get(point.name) == "visiting":
      cycle = " -> ".join((*chain, point.name))
      raise ConfigError(f"points depend on each other in a cycle: {cycle}")
    state[point.name] = "visiting"
    if point.after is not None:
      visit(by_name[point.after], (*chain, point.name))
    state[point.name] = "done"
    ordered.append(point)

  for point in points:
    visit(point, ())
  return ordered


def with_dependencies(spec: SweepSpec, names: list[str]) -> list[Point]:
  """The named points and everything they start from, in run order."""
  wanted: set[str] = set()
  for name in names:
    point = spec.point(name)
    while point is not None and point.name not in wanted:
      wanted.add(point.name)
      point = spec.point(point.after) if point.after else None
  return [p for p in spec.points if p.name in wanted]


def load_sweep(spec: str) -> SweepSpec:
  """Reads `sweep`, `metrics` and `plots` of "configs/NAME.py[:ARGS]"."""
  path, arg = config_path(spec)
  module = load_module(path)
  for required in ("get_config", "sweep"):
    if not hasattr(module, required):
      raise ConfigError(
        f"{path} defines no {required}(); a sweep config has get_config(arg), "
        "sweep(add, arg=None) and metrics(arg) (see lcjax.sweep.points)"
      )
  points = order_points(_collect(module.sweep, arg, path))
  metrics = tuple(module.metrics(arg)) if hasattr(module, "metrics") else ("eval/*",)
  plots = tuple(module.plots(arg)) if hasattr(module, "plots") else ()
  for i, plot in enumerate(plots):
    missing = {"file", "metric"} - set(plot)
    if missing or "{x}" not in str(plot.get("metric", "")):
      raise ConfigError(
        f"{path}: plots()[{i}] needs 'file' and a 'metric' with an {{x}} placeholder, "
        f"e.g. metric='eval/ppl@{{x}}/trained'; got {dict(plot)}"
      )
  return SweepSpec(spec, tuple(points), metrics, plots)


def point_config(
  spec: SweepSpec,
  point: Point,
  *,
  sweep_dir: str | None,
  then: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """The locked run config of `point`: get_config(arg), then its overrides, then `then`.

  With `sweep_dir`, a point that starts `after` another inits from that point's folder
  in `sweep_dir`; without, `then` sets `init_from` (the command line of
  `scripts/train.py --sweep_point`, whose own `--config.*` flags are `then`).
  """
  try:
    if spec.base is None:
      config = load_config(spec.spec, point.overrides)
    else:
      config = spec.base.copy_and_resolve_references()
      config.lock()
      apply_overrides(config, point.overrides)
    if point.after is not None and sweep_dir is not None:
      config.init_from = os.path.abspath(os.path.join(sweep_dir, point.after))
    apply_overrides(config, then or {})
  except ConfigError as e:
    raise ConfigError(f"point {point.name!r}: {e}") from None
  return config


DONE_FILE = "sweep_point.json"


def config_for_flags(config_flag, point_name: str | None) -> ml_collections.ConfigDict:
  """The run config of `scripts/train.py --config SPEC [--sweep_point NAME] --config.a=v`.

  Without a point, the flag's own config. With one, SPEC's sweep point NAME: get_config,
  the point's overrides, then the command line's `--config.*` values on top (so
  `--config.init_from=DIR/after` names the folder the point starts from).
  """
  if not point_name:
    return config_flag.value
  spec = load_sweep(config_flags.get_config_filename(config_flag))
  point = spec.point(point_name)
  config = point_config(
    spec, point, sweep_dir=None, then=config_flags.get_override_values(config_flag)
  )
  if point.after is not None and config.init_from is None:
    raise ConfigError(
      f"point {point_name!r} starts after {point.after!r}: pass "
      f"--config.init_from=SWEEP_DIR/{point.after} (what --print_commands prints)"
    )
  return config


def done_record(sweep_dir: str, name: str) -> dict | None:
  """The record the runner writes when a point finishes, or None."""
  path = os.path.join(sweep_dir, name, DONE_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def plain(value: Any) -> Any:
  """`value` as plain JSON (ConfigDicts, tuples): to record and compare a point's overrides."""

  def default(obj):
    return obj.to_dict() if hasattr(obj, "to_dict") else str(obj)

  return json.loads(json.dumps(value, default=default))


def point_status(sweep_dir: str, point: Point) -> str:
  """'done', 'started' (a run folder exists) or 'pending'."""
  if done_record(sweep_dir, point.name) is not None:
    return "done"
  return "started" if os.path.isdir(os.path.join(sweep_dir, point.name)) else "pending"
