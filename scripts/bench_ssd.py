"""Mamba-2 SSD throughput: chunked scan vs sequential scan vs causal attention (CPU).

  python scripts/bench_ssd.py                          # T = 1K, 4K, 16K
  python scripts/bench_ssd.py --lengths 1024 4096 --sequential_max 4096

Tokens/s of one forward pass (jitted, median over repeats after compilation) of
`lcjax.ssm.ssd_chunked` (Dao & Gu 2024, "Transformers are SSMs", §6: O(T·chunk) work),
`lcjax.ssm.ssd_sequential` (the step-by-step recurrence, O(T) but serial) and causal
`lcjax.attention.dot_product_attention(impl="blockwise")` (O(T²)) at the same width:
H heads of dimension P (SSD: state N per head). Every number is measured in this one
process, so the ratios compare like with like. The SSMs' tokens/s stay flat with T
(linear cost); attention's fall ~1/T (quadratic cost). This is the setting of Chen
et al. 2024, "Stuffed Mamba" (§1): a recurrent state costs the same at every length.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from lcjax.attention import dot_product_attention
from lcjax.attention.masks import MaskSpec
from lcjax.ssm import ssd_chunked, ssd_sequential


def _tokens_per_s(fn, args, tokens: int, repeats: int) -> float:
  """tokens / median seconds of `fn(*args)` over `repeats` calls after a warm-up call."""
  fn(*args).block_until_ready()  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - t)
  return tokens / statistics.median(times)


def _inputs(T: int, *, heads: int, head_dim: int, d_state: int, batch: int):
  k = jax.random.split(jax.random.key(0), 6)
  x_BTHP = jax.random.normal(k[0], (batch, T, heads, head_dim))
  dt_BTH = jax.nn.softplus(jax.random.normal(k[1], (batch, T, heads)) - 2.0)
  A_H = -jnp.exp(jax.random.normal(k[2], (heads,)))
  B_BTGN = jax.random.normal(k[3], (batch, T, 1, d_state))
  C_BTGN = jax.random.normal(k[4], (batch, T, 1, d_state))
  q_BTHD = jax.random.normal(k[5], (batch, T, heads, head_dim))
  return x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, q_BTHD


def bench(lengths, *, heads, head_dim, d_state, chunk, batch, repeats, sequential_max, block):
  rows = []
  for T in lengths:
    x, dt, A, B, C, q = _inputs(T, heads=heads, head_dim=head_dim, d_state=d_state, batch=batch)
    chunked = jax.jit(functools.partial(ssd_chunked, chunk=min(chunk, T)))
    attention = jax.jit(
      functools.partial(
        dot_product_attention,
        mask=MaskSpec(causal=True),
        impl="blockwise",
        block_q=min(block, T),
        block_kv=min(block, T),
      )
    )
    row = dict(T=T)
    row["chunked"] = _tokens_per_s(chunked, (x, dt, A, B, C), batch * T, repeats)
    row["sequential"] = None
    if T <= sequential_max:
      row["sequential"] = _tokens_per_s(
        jax.jit(ssd_sequential), (x, dt, A, B, C), batch * T, repeats
      )
    row["attention"] = _tokens_per_s(attention, (q, x, x), batch * T, repeats)
    rows.append(row)
    fmt = lambda v: "skipped" if v is None else f"{v:12,.0f}"  # noqa: E731
    print(
      f"T={T:6d}  chunked {fmt(row['chunked'])} tok/s  sequential {fmt(row['sequential'])} "
      f"tok/s  attention {fmt(row['attention'])} tok/s  chunked/attention "
      f"{row['chunked'] / row['attention']:6.2f}x"
      + ("" if row["sequential"] is None else f"  chunked/sequential "
         f"{row['chunked'] / row['sequential']:6.2f}x"),
      flush=True,
    )  # fmt: skip
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--d_state", type=int, default=64)
  p.add_argument("--chunk", type=int, default=128)
  p.add_argument("--block", type=int, default=512, help="attention block_q = block_kv")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
    "--sequential_max", type=int, default=16384, help="skip the sequential scan above this T"
  )
  a = p.parse_args(argv)
  print(
    f"{jax.devices()[0].platform} x{jax.device_count()}: batch {a.batch}, {a.heads} heads x "
    f"{a.head_dim} (width {a.heads * a.head_dim}), d_state {a.d_state}, chunk {a.chunk}, "
    f"attention blocks {a.block}",
    flush=True,
  )
  bench(
    a.lengths,
    heads=a.heads,
    head_dim=a.head_dim,
    d_state=a.d_state,
    chunk=a.chunk,
    batch=a.batch,
    repeats=a.repeats,
    sequential_max=a.sequential_max,
    block=a.block,
  )


if __name__ == "__main__":
  main()
