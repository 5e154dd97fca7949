"""LongGen hybrid: sparse layers (sink + window, or strided) around full-attention middle layers.

  python scripts/train.py --config configs/longgen_hybrid.py --workdir runs/longgen
  python scripts/train.py --config configs/longgen_hybrid.py:tiny --workdir /tmp/lg   # ~1 min
  python scripts/train.py --config configs/longgen_hybrid.py:tiny,sparse=strided --workdir /tmp/lgs

LongGen (Ge et al. 2024, "A Little Goes a Long Way: Efficient Long Context Training
and Inference with Partial Contexts", arXiv:2410.01485) trains long-context models whose
bottom and top layers see only a partial context: attention sinks (the first tokens of
the row) plus a local window, kept block-sparse so those layers cost O(T · window)
instead of O(T²); only the middle third of the layers attend to everything, which the
paper finds is enough for long-range retrieval. Here: `longgen_layer_types` places the
full layers, `model.sparse_window` / `model.sparse_sinks` size the sparse ones
(`MaskSpec(window=..., sinks=...)`), and `attention.impl=auto` runs the block-sparse
Pallas kernels on TPU/GPU (the pure-JAX blockwise twin on CPU), which visit only the
sink column and the window band of the sparse layers.

`sparse=strided` uses LongGen's other sparse layer instead, the S2-Attention pattern
(Lin et al. 2024, "S2-Attention: Hardware-Aware Context Sharding Among Attention
Heads"): sparse blocks of `model.sparse_block` tokens, the `model.sparse_local_blocks`
most recent ones plus every `model.sparse_stride`-th one, at a phase that differs per
kv head so the heads together see more of the context (`MaskSpec(stride=...)`), plus
the sinks.

Sizes: these are CPU-scale choices, not the paper's. The paper extends Llama-2 7B and
70B from 4K to 128K tokens; its exact sink count, window and S2 block/stride are not
verified here (no official LongGen code was found in the sources searched, and
notes/algorithms.md §4 leaves them open), so this config does not claim them.
`sparse_window=seq_len // 4` (128 of 512 tokens; 64 of 256 with `tiny`) keeps the sparse
layers sparse at these lengths, where a paper-scale window of thousands of tokens would
cover the whole row and make them full layers (tests/test_model.py: a window covering the
row equals the dense model). 16 sinks (8 with `tiny`) are a few first tokens, as
StreamingLLM keeps 4 (Xiao et al. 2023, arXiv:2309.17453). A sink-window layer needs
`sparse_sinks >= 1`: with 0 it would be a plain sliding window, which validation rejects
(tests/test_config.py::test_sink_window_layers_without_sinks_are_rejected).

Packed rows with document masking: sinks are the first tokens of the *row*, so with
several documents per row only the first document's queries see them (a per-document
sink would need a MaskSpec extension). Args: `tiny` (or `runlocal`) shrinks the model
and the run for a CPU smoke test; `sparse=` sink_window (default) or strided; `steps=`,
`seq_len=`.
"""

from lcjax.config import ConfigError, parse_arg
from lcjax.models.config import longgen_layer_types
from lcjax.train.config import base_config

# `sparse=` arg -> the layer type of the non-middle layers.
SPARSE_LAYERS = {"sink_window": "sink_window_attention", "strided": "strided_attention"}


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, runlocal=False, steps=600, seq_len=512, sparse="sink_window")
  if arg.sparse not in SPARSE_LAYERS:
    raise ConfigError(f"sparse={arg.sparse!r} is unknown; use one of {sorted(SPARSE_LAYERS)}")
  c = base_config()
  seq_len = arg.seq_len
  num_layers = 6  # 2 sparse, 2 full (middle third), 2 sparse

  c.model.update(
    vocab_size=384,
    d_model=128,
    num_layers=num_layers,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=352,
    max_position_embeddings=seq_len,
    rope=dict(rope_type="default", rope_theta=10000.0, max_position_embeddings=seq_len),
    layer_types=longgen_layer_types(num_layers, sparse=SPARSE_LAYERS[arg.sparse]),
    sparse_window=seq_len // 4,
    sparse_sinks=16,
    # strided: 32-token blocks, the last 4 plus every 4th (2 kv heads at phases 0 and 2)
    sparse_block=32,
    sparse_local_blocks=4,
    sparse_stride=4,
    dtype="float32",
  )
  c.data.seq_len = seq_len
  c.data.position_scheme = "per_document"
  c.attention.update(impl="auto", block_q=128, block_kv=128)

  c.train.update(steps=arg.steps, batch_size=8, lr=3e-3, warmup_steps=50, log_every=25)
  c.checkpoint.update(every_steps=200, keep=2)
  c.eval.update(every_steps=200, batches=2, ppl_lengths=(seq_len, 2 * seq_len), ppl_max_documents=8)
  if arg.tiny or arg.runlocal:
    seq_len = 256
    c.data.seq_len = seq_len
    c.model.update(
      num_layers=3,
      d_model=64,
      mlp_dim=176,
      layer_types=longgen_layer_types(3, sparse=SPARSE_LAYERS[arg.sparse]),  # sparse, full, sparse
      sparse_window=64,
      sparse_sinks=8,
      sparse_block=16,
      max_position_embeddings=seq_len,
    )
    c.model.rope.max_position_embeddings = seq_len
    c.attention.update(block_q=64, block_kv=64)
    c.train.update(steps=30, warmup_steps=5, log_every=5)
    c.checkpoint.every_steps = 10
    c.eval.update(every_steps=0, ppl_lengths=(seq_len,), ppl_max_documents=2)
  return c
