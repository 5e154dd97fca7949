"""Runs a sweep config's points in order and gathers their results.

  python scripts/sweep.py --config configs/rope_extrapolation.py:smoke --workdir DIR
  python scripts/sweep.py --config configs/rope_extrapolation.py:runlocal --workdir DIR --list
  python scripts/sweep.py --config ... --workdir DIR --only pretrain,pi4_ft
  python scripts/sweep.py --config ... --workdir DIR --print_commands   # one command per point

Each point runs in DIR/<point>/ through lcjax.train.train (or, for eval-only points, the
evaluation of its init_from model); finished points are skipped and interrupted ones
resume. Results: DIR/results.csv, DIR/results.md, DIR/plots/. See lcjax.sweep.
"""

from __future__ import annotations

from absl import flags, logging

from lcjax.cli import run
from lcjax.sweep import list_points, load_sweep, print_commands, run_sweep
from lcjax.sweep.points import with_dependencies
from lcjax.train import TrainingDiverged

_CONFIG = flags.DEFINE_string("config", None, "configs/NAME.py[:args], a sweep config")
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep folder: one run folder per point")
_ONLY = flags.DEFINE_list("only", None, "run only these points (and what they start from)")
_LIST = flags.DEFINE_bool("list", False, "list the points and their status; run nothing")
_PRINT = flags.DEFINE_bool(
  "print_commands", False, "print one scripts/train.py command per point; run nothing"
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  spec = load_sweep(_CONFIG.value)
  if _LIST.value:
    list_points(spec, _WORKDIR.value)
    return 0
  if _PRINT.value:
    points = with_dependencies(spec, _ONLY.value) if _ONLY.value else list(spec.points)
    print_commands(spec, _WORKDIR.value, points)
    return 0
  run_sweep(spec, _WORKDIR.value, only=_ONLY.value)
  return 0


if __name__ == "__main__":
  run(main, config_flags=(), errors={TrainingDiverged: 3})
