"""Converts between Hugging Face checkpoint folders, lcjax params folders and training runs.

python scripts/convert_hf.py --to lcjax --src HF_FOLDER --dst LCJAX_FOLDER
python scripts/convert_hf.py --to hf --src LCJAX_FOLDER --dst HF_FOLDER
python scripts/convert_hf.py --to hf --src RUN_WORKDIR --dst HF_FOLDER [--step N]
add --verify to compare logits with transformers (needs torch + transformers)

A run folder (`scripts/train.py --workdir`) exports its newest complete checkpoint, or
checkpoint N with --step; the model config is the one the run trained (its
model_config.json), so a run started from `init_from` exports without that folder.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from lcjax.cli import fail
from lcjax.config import ConfigError
from lcjax.interop.hf import CheckpointError, load_pretrained, save_pretrained
from lcjax.interop.native import load_params, save_params
from lcjax.train.run_model import load_run_params, model_from_params


def verify(model, hf_folder: str, vocab_size: int) -> float:
  """Max |logit difference| between lcjax and transformers on random tokens."""
  import torch
  import transformers

  tokens = np.random.default_rng(0).integers(0, vocab_size, size=(2, 64))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model(tokens))
  return float(np.max(np.abs(got - want)))


def is_run_folder(path: str) -> bool:
  """A `scripts/train.py --workdir` folder: it holds checkpoints/."""
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_source(src: str, step: int | None):
  """(model, model_config, description) of an lcjax params folder or a run folder."""
  if is_run_folder(src):
    params, cfg, step = load_run_params(src, step=step)
    return model_from_params(params, cfg), cfg, f"{src}/checkpoints/{step}"
  if step is not None:
    raise ConfigError(f"--step applies to a run folder with checkpoints/, which {src} is not")
  model, cfg = load_params(src)
  return model, cfg, src


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--to", choices=("lcjax", "hf"), required=True)
  parser.add_argument("--src", required=True, help="HF folder, lcjax params folder or run folder")
  parser.add_argument("--dst", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder")
  parser.add_argument("--verify", action="store_true", help="compare logits with transformers")
  args = parser.parse_args(argv)

  try:
    if args.to == "lcjax":
      if args.step is not None:
        raise ConfigError("--step applies to --to hf from a run folder")
      model, cfg = load_pretrained(args.src)
      save_params(model, cfg, args.dst)
      hf_folder, source = args.src, args.src
    else:
      model, cfg, source = load_source(args.src, args.step)
      save_pretrained(model, cfg, args.dst)
      hf_folder = args.dst
  except (CheckpointError, ConfigError, FileNotFoundError) as e:
    return fail(str(e))
  kind = cfg.get("hf_model_type", cfg.get("family"))
  print(f"wrote {args.dst} from {source} ({kind}, {cfg.num_layers} layers, d_model {cfg.d_model})")
  if args.verify:
    diff = verify(model, hf_folder, cfg.vocab_size)
    print(f"max |logits(lcjax) - logits(transformers)| = {diff:.3e}")
    if diff > 1e-3:
      return fail("logits differ more than float32 rounding explains", 1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
