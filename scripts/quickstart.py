"""lcjax quickstart (foundation stage): a tiny Llama end to end on this machine.

  make quickstart        # or: python scripts/quickstart.py [--workdir runs/quickstart]

Packs three real documents (files of Python's standard library, as bytes) into
one row with document masking and per-document positions, checks that the
blockwise attention path gives the reference path's logits, greedily decodes
with the KV cache, and round-trips the model through a Hugging Face folder.
The training job replaces this once the training pipeline lands.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.interop.hf import load_pretrained, save_pretrained
from lcjax.models import build_model, generate, llama_config
from lcjax.positional.positions import make_positions


def stdlib_documents(n: int, length: int) -> list[bytes]:
  """The first `length` bytes of `n` standard-library modules (sorted, deterministic)."""
  root = sysconfig.get_paths()["stdlib"]
  names = sorted(f for f in os.listdir(root) if f.endswith(".py"))
  docs = []
  for name in names:
    with open(os.path.join(root, name), "rb") as f:
      data = f.read(length)
    if len(data) == length:
      docs.append(data)
    if len(docs) == n:
      return docs
  raise RuntimeError(f"found fewer than {n} standard-library files of {length} bytes in {root}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--workdir", default="runs/quickstart")
  args = parser.parse_args(argv)
  start = time.time()
  print(f"lcjax quickstart on {jax.default_backend()} ({jax.device_count()} device(s))")

  rope = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=128,
    max_position_embeddings=512,
  )
  cfg = llama_config(
    vocab_size=384,
    d_model=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=352,
    max_position_embeddings=512,
    rope=rope,
    dtype="float32",
    attention_block_q=64,
    attention_block_kv=64,
  )
  model = build_model(cfg, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(
    f"model: llama, {cfg.num_layers} layers, d_model {cfg.d_model}, {n_params:,} params, "
    f"rope {rope['rope_type']} x{rope['factor']}"
  )

  docs = stdlib_documents(3, 160)
  tokens_BT = jnp.asarray([np.frombuffer(b"".join(docs), np.uint8).astype(np.int32)])
  segment_ids_BT = jnp.asarray([np.repeat(np.arange(1, 4), 160)])
  positions_BT = make_positions(segment_ids_BT, "per_document")
  print(f"packed row: {tokens_BT.shape[1]} byte tokens, 3 documents, per-document positions")

  logits = {}
  for impl in ("reference", "blockwise"):
    # Same seed, same weights: only the attention implementation differs.
    cfg.attention_impl = impl
    m = build_model(cfg, rngs=nnx.Rngs(0))
    logits[impl] = m(tokens_BT, positions=positions_BT, segment_ids=segment_ids_BT)
  diff = float(jnp.max(jnp.abs(logits["reference"] - logits["blockwise"])))
  print(f"attention: max |logits(blockwise) - logits(reference)| = {diff:.2e}")

  prompt = tokens_BT[:, :32]
  out = generate(model, prompt, max_new_tokens=16)
  print(f"generate: 32-token prompt + 16 greedy tokens with the KV cache -> {out.shape}")

  hf_dir = os.path.join(args.workdir, "hf_export")
  save_pretrained(model, cfg, hf_dir)
  loaded, _ = load_pretrained(hf_dir)
  same = jax.tree.all(
    jax.tree.map(
      lambda x, y: bool(jnp.array_equal(x, y)),
      nnx.state(model, nnx.Param),
      nnx.state(loaded, nnx.Param),
    )
  )
  print(f"Hugging Face round trip via {hf_dir}: parameters identical = {same}")

  ok = diff < 1e-4 and same
  print(f"quickstart {'passed' if ok else 'FAILED'} in {time.time() - start:.1f} s")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
