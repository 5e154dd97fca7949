"""Converts between Hugging Face checkpoint folders and lcjax params folders.

python scripts/convert_hf.py --to lcjax --src HF_FOLDER --dst LCJAX_FOLDER
python scripts/convert_hf.py --to hf --src LCJAX_FOLDER --dst HF_FOLDER
add --verify to compare logits with transformers (needs torch + transformers)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--to", choices=("lcjax", "hf"), required=True)
  parser.add_argument("--src", required=True)
  parser.add_argument("--dst", required=True)
  parser.add_argument("--verify", action="store_true", help="compare logits with transformers")
  args = parser.parse_args(argv)

  from lcjax.interop.hf import CheckpointError, load_pretrained, save_pretrained
  from lcjax.interop.native import load_params, save_params

  try:
    if args.to == "lcjax":
      model, cfg = load_pretrained(args.src)
      save_params(model, cfg, args.dst)
      hf_folder = args.src
    else:
      model, cfg = load_params(args.src)
      save_pretrained(model, cfg, args.dst)
      hf_folder = args.dst
  except (CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.dst} ({cfg.hf_model_type}, {cfg.num_layers} layers, d_model {cfg.d_model})")
  if args.verify:
    diff = verify(model, hf_folder, cfg.vocab_size)
    print(f"max |logits(lcjax) - logits(transformers)| = {diff:.3e}")
    if diff > 1e-3:
      print("error: logits differ more than float32 rounding explains", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
