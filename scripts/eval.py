"""Evaluates the newest checkpoint of a run, or a Hugging Face checkpoint.

  python scripts/eval.py --config configs/quickstart.py --workdir runs/quickstart \
      --config.eval.ppl_lengths='(256,512,1024,2048)'
  python scripts/eval.py --config configs/quickstart.py --workdir runs/quickstart \
      --config.eval.tasks='("ruler","niah")' --config.eval.lengths='(1024,2048,4096)'
  python scripts/eval.py --hf /models/Llama-3.1-8B-Instruct --workdir runs/llama_ruler \
      --config.eval.lengths='(4096,8192)' --config.eval.ruler.chat_template=meta-llama3
  python scripts/eval.py --config configs/quickstart.py --workdir runs/quickstart \
      --config.eval.tasks='("longbench",)' --config.eval.longbench.path=data/longbench \
      --config.eval.longbench.datasets='("hotpotqa",)' --config.eval.longbench.max_len=3500

Without `eval.tasks`, the run config's evaluations (perplexity vs. length, passkey, ...:
`lcjax.train.evaluate.evaluate_workdir`). With `eval.tasks`, those tasks only
(`lcjax.eval.ruler_run.evaluate_tasks`, one model load):
- RULER task names or groups ("ruler", "niah", "aggregation", ...) at `eval.lengths` tokens:
  WORKDIR/eval/ruler.json, WORKDIR/eval/ruler.md and the depth × length heatmaps
  WORKDIR/plots/niah_<task>.png;
- "longbench": LongBench on the local JSONL files of `eval.longbench.path` (LongBench's
  data.zip layout), greedy: WORKDIR/eval/longbench.json and WORKDIR/eval/longbench.md.
`--hf PATH` evaluates a Hugging Face folder (config.json, safetensors, tokenizer) with its own
tokenizer, writing into --workdir; its --config defaults to configs/ruler_eval.py (every RULER
task at 4K, 8K, 16K).
"""

from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from lcjax.cli import fail, run
from lcjax.config import config_path
from lcjax.eval.longbench import LongBenchError
from lcjax.eval.ruler_data import RulerError
from lcjax.eval.ruler_run import evaluate_tasks
from lcjax.sweep.points import config_for_flags
from lcjax.train.config import validate_config
from lcjax.train.evaluate import evaluate_workdir

_CONFIG = config_flags.DEFINE_config_file(
  "config", config_path("ruler_eval.py")[0], "configs/NAME.py[:args]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder with checkpoints/ (or the output)")
_SWEEP_POINT = flags.DEFINE_string(
  "sweep_point", None, "run this point of a sweep config (scripts/sweep.py --print_commands)"
)
_HF = flags.DEFINE_string(
  "hf", None, "a Hugging Face folder to evaluate with its own tokenizer (sets init_from)"
)
flags.mark_flags_as_required(["workdir"])


def with_hf(config, path: str):
  """`config` evaluating the Hugging Face folder `path`: init_from and its tokenizer."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--hf {path}: not a folder; point it at a Hugging Face checkpoint")
  config.init_from = path
  config.data.tokenizer.kind = "hf"
  config.data.tokenizer.path = path
  return config


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  if not _HF.value and not flags.FLAGS["config"].present:
    return fail("pass --config configs/NAME.py (the run's config) or --hf PATH (an HF folder)")
  config = config_for_flags(flags.FLAGS["config"], _SWEEP_POINT.value)
  if _HF.value:
    config = with_hf(config, _HF.value)
  validate_config(config)
  if config.eval.tasks:
    evaluate_tasks(config, _WORKDIR.value)
  else:
    evaluate_workdir(config, _WORKDIR.value)
  return 0


if __name__ == "__main__":
  run(main, errors={RulerError: 2, LongBenchError: 2})
