"""RULER and NIAH evaluation of a Hugging Face checkpoint: the config of scripts/eval.py --hf.

  python scripts/eval.py --hf /models/Llama-3.1-8B-Instruct --workdir runs/llama_ruler \
      --config.eval.lengths='(4096,8192,16384)' --config.eval.ruler.chat_template=meta-llama3
  python scripts/eval.py --config configs/ruler_eval.py:smoke --hf HF_FOLDER --workdir /tmp/r

The model and its tokenizer come from --hf (this config's `init_from`, set by the script);
the config holds the evaluation (`eval.tasks`, `eval.lengths`, `eval.ruler.*`) and the
attention settings. `smoke`: three tasks at 512 and 1024 tokens, 2 samples each (seconds on a
tiny model). Outputs: WORKDIR/eval/ruler.json, WORKDIR/eval/ruler.md, WORKDIR/plots/niah_*.png.
"""

from lcjax.config import parse_arg
from lcjax.train.config import base_config


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False)
  c = base_config()
  c.eval.update(every_steps=0, ppl_lengths=(), tasks=("ruler",), lengths=(4096, 8192, 16384))
  if arg.smoke:
    c.eval.tasks = ("niah_single_1", "niah_multikey_2", "fwe")
    c.eval.lengths = (512, 1024)
    c.eval.ruler.update(samples=2, batch_size=2)
  return c
