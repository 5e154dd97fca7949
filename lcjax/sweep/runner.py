"""Runs a sweep's points in order through `lcjax.train.train`, skipping finished ones.

  python scripts/sweep.py --config configs/rope_extrapolation.py:smoke --workdir DIR
      [--only NAME[,NAME]] [--list] [--print_commands]

Every point's locked config is validated before any runs (a misspelt override fails
naming the point and the field). Each point runs in `DIR/<point>/` as an ordinary
run folder: a training point resumes from its newest checkpoint when it was
interrupted; a finished point (`DIR/<point>/sweep_point.json`) is skipped, so a rerun
of a finished sweep trains nothing and only gathers the results. The runner is not a
scheduler: `--print_commands` prints one `scripts/train.py` (or, for eval-only
points, `scripts/eval.py`) command per point for a pod or a SLURM array.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Any

import jax

from lcjax.config import ConfigError
from lcjax.sweep.points import (
  DONE_FILE,
  Point,
  SweepSpec,
  done_record,
  plain,
  point_config,
  point_status,
  with_dependencies,
)
from lcjax.sweep.results import gather_results, write_results
from lcjax.train import train
from lcjax.train.config import validate_config
from lcjax.train.evaluate import evaluate_init
from lcjax.train.progress import format_duration
from lcjax.train.run_model import init_model_config, model_config_for_run

__all__ = [
  "print_commands",
  "list_points",
  "run_sweep",
  "validate_points",
]


def validate_points(spec: SweepSpec, sweep_dir: str, points: list[Point]) -> dict[str, Any]:
  """Each point's locked, validated config (ConfigError naming the point on the first bad one).

  A point that starts after another is checked against the model that point will
  write (its config's model, with its own `init_from` and `model_overrides`), so a bad
  `model_overrides` fails now, not after its dependency has trained.
  """
  configs: dict[str, Any] = {}
  model_configs: dict[str, Any] = {}
  for point in spec.points:  # all of them: a dependency's model is needed by its dependents
    config = point_config(spec, point, sweep_dir=sweep_dir)
    try:
      if point.after is not None:
        parent = model_configs[point.after]
        validate_config(config, init_model_config=parent)
        model_configs[point.name] = model_config_for_run(config, parent)
      else:
        validate_config(config)
        init = None if config.init_from is None else init_model_config(config.init_from)
        model_configs[point.name] = model_config_for_run(config, init)
    except ConfigError as e:
      raise ConfigError(f"point {point.name!r}: {e}") from None
    configs[point.name] = config
    record = done_record(sweep_dir, point.name)
    if record is not None and record.get("overrides") != plain(dict(point.overrides)):
      raise ConfigError(
        f"point {point.name!r} finished in {os.path.join(sweep_dir, point.name)} with other "
        f"overrides ({record.get('overrides')}); delete that folder to rerun it with the new ones"
      )
  return {p.name: configs[p.name] for p in points}


def _format_overrides(point: Point) -> str:
  parts = [f"{k}={plain(v)}" for k, v in point.overrides.items()]
  return ", ".join(parts) if parts else "(base config)"


def list_points(spec: SweepSpec, sweep_dir: str, out=None) -> None:
  """One line per point: status, what it starts from, its overrides."""
  out = out or sys.stdout
  for i, point in enumerate(spec.points, 1):
    kind = "eval" if point.eval_only else "train"
    after = f" after {point.after}" if point.after else ""
    status = point_status(sweep_dir, point)
    print(f"{i:>3}. {point.name} [{kind}{after}] {status}: {_format_overrides(point)}", file=out)


def print_commands(spec: SweepSpec, sweep_dir: str, points: list[Point], out=None) -> None:
  """One command line per point, in dependency order, each saying what it waits for."""
  out = out or sys.stdout
  for point in points:
    script = "scripts/eval.py" if point.eval_only else "scripts/train.py"
    args = [
      "python",
      script,
      "--config",
      spec.spec,
      "--sweep_point",
      point.name,
      "--workdir",
      os.path.join(sweep_dir, point.name),
    ]
    if point.after is not None:
      args.append(f"--config.init_from={os.path.join(os.path.abspath(sweep_dir), point.after)}")
    wait = f"  # after {point.after}" if point.after else ""
    print(shlex.join(args) + wait, file=out)


def _run_point(point: Point, config, workdir: str) -> bool:
  """Trains or evaluates one point; True when it finished (not stopped by a signal)."""
  if point.eval_only:
    evaluate_init(config, workdir)
    return True
  return train(config, workdir)["step"] >= config.train.steps


def run_sweep(
  spec: SweepSpec, sweep_dir: str, *, only: list[str] | None = None, out=None
) -> dict[str, Any]:
  """Runs the (selected) points that are not finished, then gathers the results.

  Returns {"ran": [...], "skipped": [...], "results": rows} ; raises ConfigError before
  running anything when a point's config is invalid.
  """
  out = out or sys.stdout
  points = list(spec.points) if not only else with_dependencies(spec, only)
  extra = [p.name for p in points if only and p.name not in only]
  if extra:
    print(f"sweep: also running what --only's points start from: {', '.join(extra)}", file=out)
  configs = validate_points(spec, sweep_dir, points)
  os.makedirs(sweep_dir, exist_ok=True)
  todo = [p for p in points if point_status(sweep_dir, p) != "done"]
  skipped = [p.name for p in points if p not in todo]
  if skipped:
    print(f"sweep: {len(skipped)} of {len(points)} points already finished", file=out)
  ran: list[str] = []
  t_start = time.time()
  for i, point in enumerate(todo):
    elapsed = time.time() - t_start
    eta = f", ETA {format_duration(elapsed / i * (len(todo) - i))}" if i else ""
    kind = "eval only" if point.eval_only else "train"
    after = f" after {point.after}" if point.after else ""
    print(
      f"sweep: point {i + 1}/{len(todo)} {point.name} ({kind}{after}); "
      f"elapsed {format_duration(elapsed)}{eta}",
      file=out,
      flush=True,
    )
    workdir = os.path.join(sweep_dir, point.name)
    t0 = time.time()
    if not _run_point(point, configs[point.name], workdir):
      print(
        f"sweep: {point.name} stopped before its last step; rerun the same command to resume",
        file=out,
      )
      break
    record = {
      "point": point.name,
      "after": point.after,
      "eval_only": point.eval_only,
      "overrides": plain(dict(point.overrides)),
      "seconds": round(time.time() - t0, 1),
      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = os.path.join(workdir, DONE_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(workdir, DONE_FILE))
    ran.append(point.name)
    jax.clear_caches()  # each point compiles its own shapes; keep memory flat over the sweep
  rows = gather_results(spec, sweep_dir)
  written = write_results(spec, sweep_dir, rows)
  plots = [w for w in written if w.endswith(".png")]
  print(
    f"sweep: {len(ran)} run, {len(skipped)} skipped; wrote {os.path.join(sweep_dir, 'results.csv')}"
    f", results.md and {len(plots)} plots in {os.path.join(sweep_dir, 'plots')}",
    file=out,
  )
  return {"ran": ran, "skipped": skipped, "results": rows}
