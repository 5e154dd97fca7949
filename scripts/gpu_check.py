"""Compiled Pallas attention (Triton on GPU, Mosaic on TPU) == the reference: outputs and grads.

  python scripts/gpu_check.py                       # T = 2048, every mask, fp32 and bf16
  python scripts/gpu_check.py --blocks 32,64,128 --groups 1,4   # which block sizes fit

The test suite runs the kernels in Pallas interpret mode on CPU (tests/test_pallas_kernels.py);
this script is the same comparison for the compiled lowering, run on an accelerator when
one is lent. Each mask of scripts/bench_attention_blocks.py (dense causal, packed documents,
AnchorAttention, sink + window, S2 strided) is run with 2 kv heads and G query heads each
(GQA; --groups) through `dot_product_attention(impl="pallas")` and `impl="reference"`
(materialized float32 scores, matmuls at HIGHEST precision), forward and the gradients
of a random projection of the output. It prints the relative max error per case and
exits 1 when one exceeds its dtype's tolerance or fails to lower (e.g. shared memory):
- float32: 2e-5 × max|ref|. The kernel accumulates in float32 in a different order
  (online softmax over blocks), which moves results by a few ulps times √(number of
  blocks); TF32 would be ~1e-3 and fails it, which is the point of checking.
- bfloat16: 2e-2. Inputs are bf16 (8 mantissa bits, relative spacing 2⁻⁸ ≈ 4e-3); the
  kernel feeds bf16 probabilities to the PV matmul and returns bf16, so each output is
  rounded about twice more than the fp32 reference.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import MaskSpec, dot_product_attention

TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


def masks(T: int) -> dict[str, tuple[MaskSpec, np.ndarray | None]]:
  """name -> (MaskSpec, segment ids [T] or None): the masks of bench_attention_blocks."""
  bounds = np.sort(np.random.default_rng(0).choice(np.arange(1, T), 7, replace=False))
  seg_T = np.searchsorted(bounds, np.arange(T), side="right").astype(np.int32)
  return {
    "causal": (MaskSpec(causal=True), None),
    "documents": (MaskSpec(causal=True, document=True), seg_T),
    "anchor": (MaskSpec(causal=True, document=True, anchor=True), seg_T),
    "sink_window": (MaskSpec(causal=True, window=T // 8, sinks=4), None),
    "strided": (MaskSpec(stride=8, stride_block=128, local_blocks=4), None),
  }


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check(T: int, dtype, block: int, groups: int = 4) -> list[tuple[str, str, float, bool]]:
  B, Hkv, D = 2, 2, 128
  Hq = Hkv * groups
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, Hq, D), dtype)
  k = jax.random.normal(keys[1], (B, T, Hkv, D), dtype)
  v = jax.random.normal(keys[2], (B, T, Hkv, D), dtype)
  proj = jax.random.normal(keys[3], (B, T, Hq, D), jnp.float32)
  rows = []
  for name, (spec, seg_T) in masks(T).items():
    seg = None if seg_T is None else jnp.broadcast_to(jnp.asarray(seg_T), (B, T))

    def loss(q, k, v, impl, spec=spec, seg=seg):
      out = dot_product_attention(
        q, k, v, mask=spec, q_segment_ids=seg, impl=impl, block_q=block, block_kv=block
      )
      return jnp.sum(out.astype(jnp.float32) * proj), out

    results = {}
    for impl in ("pallas", "reference"):
      with jax.default_matmul_precision("highest" if impl == "reference" else "default"):
        fn = jax.jit(
          jax.value_and_grad(
            lambda q, k, v, impl=impl: loss(q, k, v, impl), argnums=(0, 1, 2), has_aux=True
          )
        )
        (_, out), grads = fn(q, k, v)
      results[impl] = (out, *grads)
    tol = TOLERANCE[jnp.dtype(dtype).name]
    for label, got, want in zip(
      ("out", "dq", "dk", "dv"), results["pallas"], results["reference"], strict=True
    ):
      err = relative_error(got, want)
      rows.append((name, label, err, err <= tol))
  return rows


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--blocks", default="128", help="comma-separated block sizes (q = kv)")
  parser.add_argument("--groups", default="4", help="comma-separated query heads per kv head")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
  if jax.default_backend() == "cpu":
    print(
      "No accelerator: the compiled kernels are checked only on GPU/TPU "
      "(tests/test_pallas_kernels.py runs them in interpret mode on CPU)."
    )
    return 0
  failed = 0
  print("| block | G | dtype | mask | tensor | max rel. error | tolerance | ok |")
  print("|---:|---:|---|---|---|---:|---:|---|")
  grid = [(int(b), int(g)) for b in args.blocks.split(",") for g in args.groups.split(",")]
  for block, groups in grid:
    for dtype in (jnp.float32, jnp.bfloat16):
      name, case = jnp.dtype(dtype).name, f"| {block} | {groups} | {jnp.dtype(dtype).name}"
      try:
        rows = check(args.seq_len, dtype, block, groups)
      except Exception as e:  # noqa: BLE001 - report a lowering failure per case, go on
        print(f"{case} | all | - | failed: {type(e).__name__}: {str(e)[:200]} | | no |")
        failed += 1
        continue
      for mask, label, err, ok in rows:
        failed += not ok
        tol = TOLERANCE[name]
        print(f"{case} | {mask} | {label} | {err:.2e} | {tol:.0e} | {'yes' if ok else 'NO'} |")
      sys.stdout.flush()
  sys.stdout.flush()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
