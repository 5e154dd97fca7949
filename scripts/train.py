"""Trains a model from a config: the one way to train in lcjax.

  python scripts/train.py --config configs/quickstart.py --workdir runs/quickstart
  python scripts/train.py --config configs/quickstart.py:runlocal --workdir /tmp/q \
      --config.train.steps=50 --config.model.num_layers=2

Rerunning the same command resumes from the newest complete checkpoint. A config with
`stages` runs them in WORKDIR/stage-<k>/, each from the previous one's final checkpoint
(lcjax.sweep.stages); a finished stage is never rerun.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from lcjax.cli import run
from lcjax.config import ConfigError
from lcjax.parallel.distributed import maybe_initialize
from lcjax.sweep.points import config_for_flags
from lcjax.sweep.stages import largest_stage, run_stages
from lcjax.train import TrainingDiverged, train
from lcjax.train.aot import compile_train_step, format_report

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/NAME.py[:args]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: config.json, metrics, checkpoints")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_COMPILE_ONLY = flags.DEFINE_bool(
  "compile_only",
  False,
  "compile the train step for --topology; print memory per chip and host and the attention "
  "impl; no training",
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology for --compile_only, e.g. v5p:4x4x4")
_SWEEP_POINT = flags.DEFINE_string(
  "sweep_point", None, "run this point of a sweep config (scripts/sweep.py --print_commands)"
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
  # Multi-process when flags, SLURM or a TPU pod say so; before anything touches devices.
  maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  config = config_for_flags(flags.FLAGS["config"], _SWEEP_POINT.value)
  if _COMPILE_ONLY.value:
    if not _TOPOLOGY.value:
      raise ConfigError("--compile_only needs --topology, e.g. --topology v5p:4x4x4")
    if config.stages:  # a stage chain: its largest step is what must fit the pod
      name, config = largest_stage(config)
      print(f"{name} (the stage with the most tokens per step):")
    print(format_report(compile_train_step(config, _TOPOLOGY.value)))
    return 0
  if config.stages:
    run_stages(config, _WORKDIR.value)
  else:
    train(config, _WORKDIR.value)
  return 0


if __name__ == "__main__":
  run(main, errors={TrainingDiverged: 3})
