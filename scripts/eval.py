"""Evaluates the newest checkpoint of a run (perplexity vs. length, passkey, plots).

  python scripts/eval.py --config configs/quickstart.py --workdir runs/quickstart \
      --config.eval.ppl_lengths='(256,512,1024,2048)'
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from lcjax.cli import run
from lcjax.sweep.points import config_for_flags
from lcjax.train.config import validate_config
from lcjax.train.evaluate import evaluate_workdir

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/NAME.py[:args]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder with checkpoints/")
_SWEEP_POINT = flags.DEFINE_string(
  "sweep_point", None, "run this point of a sweep config (scripts/sweep.py --print_commands)"
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = config_for_flags(flags.FLAGS["config"], _SWEEP_POINT.value)
  validate_config(config)
  evaluate_workdir(config, _WORKDIR.value)
  return 0


if __name__ == "__main__":
  run(main)
