"""Trains a model from a config: the one way to train in lcjax.

  python scripts/train.py --config configs/quickstart.py --workdir runs/quickstart
  python scripts/train.py --config configs/quickstart.py:runlocal --workdir /tmp/q \
      --config.train.steps=50 --config.model.num_layers=2

Rerunning the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/NAME.py[:args]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: config.json, metrics, checkpoints")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
  from lcjax.config import ConfigError
  from lcjax.train import TrainingDiverged, train

  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
