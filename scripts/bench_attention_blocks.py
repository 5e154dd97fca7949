"""Block density of attention masks, and kernel speed on an accelerator.

  python scripts/bench_attention_blocks.py                 # T = 8192, 128-blocks
  python scripts/bench_attention_blocks.py --seq_len 32768 --heads 16

1. Block tables. For each mask at T = 8K with 128 x 128 blocks — dense causal, 8 packed
   documents, AnchorAttention over the same 8 documents (Wang et al. 2025, "When
   Precision Meets Position": documents masked from each other, the row's first token
   visible to all), LongGen's sink + window layer (Ge et al. 2024, "A Little Goes a
   Long Way: Efficient Long Context Training and Inference with Partial Contexts") and
   LongGen's strided layer as S2-Attention computes it (Lin et al. 2024, "S2-Attention:
   Hardware-Aware Context Sharding Among Attention Heads": 128-token sparse blocks, a
   local band of 4 blocks and every 8th block before it, the phase shifted per kv head,
   --heads kv heads) — the number of (q block, kv block) pairs that the Pallas kernels'
   compacted tables visit (`pallas_kernels.block_sparse_tables`, forward/dQ and dK/dV
   lists), as a fraction of dense causal. The strided mask differs per kv head, so its
   tables are per head: its counts are summed over the heads and compared with dense
   causal times the number of heads. Each count is checked against the mask's block
   density computed independently: the element mask written out in numpy from its
   definition, reduced to blocks with `any`. The kernel computes exactly these blocks,
   so for FlashAttention-2 style kernels (Dao 2023) the compute saving is this fraction.
2. Speed, only when a GPU or TPU backend is present: forward and forward + backward
   TFLOP/s of `dot_product_attention(impl="pallas")` per mask, and of
   `jax.nn.dot_product_attention` on dense causal (cuDNN flash attention on GPU, XLA
   on TPU). FLOPs count only the visible (query, key) pairs (4·D per pair forward, 2.5x
   that backward, the FlashAttention-2 convention), so equal TFLOP/s across masks means
   wall time proportional to block density. On CPU it says that timing needs an accelerator.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import MaskSpec, dot_product_attention
from pallas_kernels import block_sparse_tables, visited_blocks

DOCS = 8
WINDOW, SINKS = 1024, 64  # LongGen-style sparse layer, scaled to T = 8K
STRIDE, STRIDE_BLOCK, LOCAL_BLOCKS = 8, 128, 4  # LongGen's strided layer (S2-Attention)


def document_lengths(T: int, n_docs: int, seed: int = 0) -> np.ndarray:
  """n_docs lengths summing to T, uneven, with boundaries that mostly fall mid-block."""
  cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, T), n_docs - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [T]]))


def segment_ids(T: int, n_docs: int) -> np.ndarray:
  return np.repeat(np.arange(1, n_docs + 1), document_lengths(T, n_docs)).astype(np.int32)


def masks(T: int) -> dict[str, tuple[MaskSpec, np.ndarray | None]]:
  """name -> (MaskSpec, segment ids [T] or None)."""
  seg_T = segment_ids(T, DOCS)
  return {
    "dense causal": (MaskSpec(causal=True), None),
    f"document ({DOCS} docs)": (MaskSpec(causal=True, document=True), seg_T),
    f"anchor ({DOCS} docs)": (MaskSpec(causal=True, document=True, anchor=True), seg_T),
    f"sink+window ({SINKS}+{WINDOW})": (MaskSpec(causal=True, window=WINDOW, sinks=SINKS), None),
    f"strided (S2: stride {STRIDE}, local {LOCAL_BLOCKS}x{STRIDE_BLOCK})": (
      MaskSpec(stride=STRIDE, stride_block=STRIDE_BLOCK, local_blocks=LOCAL_BLOCKS),
      None,
    ),
  }


def element_mask(
  spec: MaskSpec, seg_T: np.ndarray | None, T: int, kv_head: int = 0, num_kv_heads: int = 1
) -> np.ndarray:
  """allowed[q, k] [T, T] from the mask's definition, written out independently of lcjax.

  A strided mask is S2-Attention's pattern for `kv_head`: keys in the query's local band
  of sparse blocks, or in a block whose index plus the head's phase is a multiple of
  the stride (phase step max(1, stride // num_kv_heads), as `MaskSpec` resolves it).
  """
  q, k = np.arange(T, dtype=np.int32)[:, None], np.arange(T, dtype=np.int32)[None, :]
  causal = k <= q
  same_doc = np.ones((T, T), bool) if seg_T is None else seg_T[:, None] == seg_T[None, :]
  if spec.window is None and spec.stride is None:
    local = np.ones((T, T), bool)
  else:
    local = k < spec.sinks
    if spec.window is not None:
      local = local | (q - k < spec.window)
    if spec.stride is not None:
      q_blk, k_blk = q // spec.stride_block, k // spec.stride_block
      step = max(1, spec.stride // num_kv_heads)
      local = local | (q_blk - k_blk < spec.local_blocks)
      local = local | ((k_blk + kv_head * step + spec.stride_offset) % spec.stride == 0)
  allowed = causal & same_doc & local
  if spec.anchor:
    allowed |= causal & (k == 0)
  return allowed


def block_density(allowed_TT: np.ndarray, block: int) -> tuple[int, int]:
  """(non-empty blocks, visible pairs) of an element mask."""
  T = allowed_TT.shape[0]
  n = T // block
  nonempty = allowed_TT.reshape(n, block, n, block).any(axis=(1, 3))
  return int(nonempty.sum()), int(allowed_TT.sum())


def table_blocks(
  spec: MaskSpec, seg_T: np.ndarray | None, T: int, block: int, heads: int
) -> tuple[int, int]:
  """Blocks visited by the kernels' forward/dQ tables and by their dK/dV tables (summed
  over the kv heads' tables for a per-head mask)."""
  pos_BT = jnp.arange(T, dtype=jnp.int32)[None]
  seg_BT = None if seg_T is None else jnp.asarray(seg_T)[None]
  fwd, bwd = block_sparse_tables(
    spec,
    pos_BT,
    pos_BT,
    seg_BT,
    seg_BT,
    block_q=block,
    block_kv=block,
    kv_len=T,
    num_kv_heads=heads,
  )
  return int(visited_blocks(fwd)), int(visited_blocks(bwd))


def density_table(T: int, block: int, heads: int) -> dict[str, int]:
  """Prints the block-density table; returns name -> visible (query, key) pairs summed
  over `heads` heads (query = kv heads, as in the timing)."""
  n = T // block
  dense_causal = n * (n + 1) // 2
  print(f"Block tables at T={T}, {block}x{block} blocks ({n}x{n} = {n * n} pairs):\n")
  header = (
    "| mask | blocks visited (fwd/dQ) | dK/dV | fraction of dense causal | mask block density |"
  )
  print(header)
  print("|---|---:|---:|---:|---:|")
  pairs = {}
  for name, (spec, seg_T) in masks(T).items():
    fwd, bwd = table_blocks(spec, seg_T, T, block, heads)
    # One table for all heads, or one per kv head (strided): count every head's blocks.
    table_heads = heads if spec.per_head else 1
    nonempty, pairs[name] = 0, 0
    for h in range(table_heads):
      head_blocks, head_pairs = block_density(element_mask(spec, seg_T, T, h, heads), block)
      nonempty, pairs[name] = nonempty + head_blocks, pairs[name] + head_pairs
    pairs[name] *= heads // table_heads
    if not fwd == bwd == nonempty:
      raise SystemExit(f"{name}: tables visit {fwd}/{bwd} blocks but the mask has {nonempty}")
    frac, density = fwd / (dense_causal * table_heads), nonempty / (dense_causal * table_heads)
    label = f"{name}, {heads} kv heads" if spec.per_head else name
    print(f"| {label} | {fwd} | {bwd} | {frac:.4f} | {density:.4f} |")
  print(
    f"\nDense causal = {dense_causal} block pairs ({dense_causal * heads} over {heads} kv heads "
    "for the per-head strided row); every count equals the mask's own."
  )
  return pairs


def _median_seconds(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _fwd_and_train(attend):
  fwd = jax.jit(attend)
  loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()  # noqa: E731
  return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def timing_table(T: int, block: int, heads: int, head_dim: int, pairs: dict[str, int]) -> None:
  backend = jax.default_backend()
  if backend not in ("gpu", "cuda", "rocm", "tpu"):
    print(f"\nTiming needs an accelerator (GPU or TPU); the backend here is {backend!r}.")
    return
  B, D = 1, head_dim
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (B, T, heads, D), jnp.bfloat16) for kk in keys)
  print(f"\nSpeed on {jax.devices()[0].device_kind}: B={B}, T={T}, H={heads}, D={D}, bf16")
  print("| attention | mask | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
  print("|---|---|---:|---:|---:|---:|")

  def row(label, name, attend):
    fwd, train = _fwd_and_train(attend)
    t_fwd, t_train = _median_seconds(fwd, q, k, v), _median_seconds(train, q, k, v)
    flops = 4 * B * D * pairs[name]  # pairs are summed over the heads
    tf_fwd, tf_train = flops / t_fwd / 1e12, 3.5 * flops / t_train / 1e12
    times = f"{t_fwd * 1e3:.2f} | {tf_fwd:.1f} | {t_train * 1e3:.2f} | {tf_train:.1f}"
    print(f"| {label} | {name} | {times} |")

  for name, (spec, seg_T) in masks(T).items():
    seg_BT = None if seg_T is None else jnp.asarray(seg_T)[None]

    def pallas(q, k, v, spec=spec, seg_BT=seg_BT):
      return dot_product_attention(
        q, k, v, mask=spec, q_segment_ids=seg_BT, impl="pallas", block_q=block, block_kv=block
      )

    row('impl="pallas"', name, pallas)
  implementation = "cudnn" if backend != "tpu" else None
  label = "jax.nn (cuDNN)" if implementation else "jax.nn (XLA)"
  dense = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
    q, k, v, is_causal=True, implementation=implementation
  )
  row(label, "dense causal", dense)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq_len", type=int, default=8192)
  parser.add_argument("--block", type=int, default=128)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=128)
  args = parser.parse_args(argv)
  if args.seq_len % args.block:
    raise SystemExit(f"--seq_len={args.seq_len} must be a multiple of --block={args.block}")
  pairs = density_table(args.seq_len, args.block, args.heads)
  timing_table(args.seq_len, args.block, args.heads, args.head_dim, pairs)


if __name__ == "__main__":
  main()
