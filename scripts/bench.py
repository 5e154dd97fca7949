"""Benchmarks; every figure is a ratio measured in this one process.

  python scripts/bench.py train       # training-step tokens/s, CPU-MFU, ratio to transformers+torch
  python scripts/bench.py attention   # block density per mask (Pallas tables); blockwise vs
                                      # reference attention: compiled memory and time
  python scripts/bench.py ssd         # Mamba-2 SSD chunked vs sequential scan vs attention
  python scripts/bench.py memory      # per-device train-step memory vs length and context size,
                                      # and ring work imbalance per layout (8 CPU devices)
  python scripts/bench.py             # all of the above

Times are taken after compilation: medians over repeated calls, except `train`, which
interleaves its three timings and keeps the fastest round of each (see `bench_train`).
MFU uses the PaLM FLOPs-per-token count (lcjax.train.flops) against a dense float32
matmul peak measured in the same process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import MaskSpec, dot_product_attention
from lcjax.attention.unrolled import fits_unrolled, static_schedule
from lcjax.config import load_config
from lcjax.interop.hf import config_to_hf
from lcjax.parallel.layouts import LAYOUTS, work_imbalance
from lcjax.train.aot import compile_train_step
from lcjax.train.flops import flops_per_token
from lcjax.train.run_model import abstract_setup, build_run_model, run_train_step
from lcjax.train.step import init_state


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _train_configs():
  """Run configs of the two benchmark models: the quickstart's, and a wider one."""
  bench_train = {  # plain AdamW at a constant rate, as the torch step below
    "train.lr": 1e-4,
    "train.warmup_steps": 0,
    "train.schedule": "constant",
    "train.weight_decay": 0.0,
    "train.grad_clip_norm": 1.0,
    "attention.block_q": 128,
    "attention.block_kv": 128,
  }
  quick = {**bench_train, "train.batch_size": 8, "train.loss_chunk": 256}
  wide = {
    **bench_train,
    "model.d_model": 512,
    "model.num_heads": 8,
    "model.num_kv_heads": 8,
    "model.mlp_dim": 1376,
    "train.batch_size": 4,
    "train.loss_chunk": 1024,
  }
  return {
    "quickstart (d128 L4 T256 B8)": load_config("configs/quickstart.py:seq_len=256", quick),
    "wide (d512 L4 T1024 B4)": load_config("configs/quickstart.py:seq_len=1024", wide),
  }


def _lcjax_step(config):
  """A warmed-up lcjax training step on random tokens: (run, number of params, model config).

  The run's own model, optimizer and step (`lcjax.train.run_model`), on one row of
  documents without a document mask, as the torch step below.
  """
  model, model_cfg = build_run_model(config)
  setup = abstract_setup(config, model_cfg)
  step = run_train_step(config, setup, document_mask=False)
  state = init_state(model, setup.tx, 0)
  B, T = config.train.batch_size, config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, size=(B, T + 1))
  b = dict(
    tokens=jnp.asarray(tokens[:, :-1], jnp.int32),
    targets=jnp.asarray(tokens[:, 1:], jnp.int32),
    segment_ids=jnp.ones((B, T), jnp.int32),
    positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
    loss_weights=jnp.ones((B, T), jnp.float32),
  )
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], b)
    jax.block_until_ready(m["loss"])

  run()
  run()
  return run, setup.n_params, model_cfg


def _torch_step(cfg, batch, T):
  """The same model's warmed-up training step in transformers + torch: (run, threads)."""
  import torch
  import transformers

  hf = config_to_hf(cfg)
  config = transformers.AutoConfig.for_model(
    **{k: v for k, v in hf.items() if k != "architectures"}
  )
  config._attn_implementation = "sdpa"
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
  tokens = torch.as_tensor(
    np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, T + 1))
  )

  def run():
    opt.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1], labels=None)
    loss = torch.nn.functional.cross_entropy(
      out.logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  run()
  run()
  return run, torch.get_num_threads()


def _matmul(n: int):
  """A warmed-up float32 n x n matmul through XLA: (run, its FLOPs)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  return lambda: f(a).block_until_ready(), 2.0 * n**3


def _torch_matmul(n: int):
  """The same float32 n x n matmul through torch (MKL/oneDNN on x86): (run, its FLOPs)."""
  import torch

  a = torch.as_tensor(np.random.default_rng(0).standard_normal((n, n)), dtype=torch.float32)
  a @ a
  return lambda: a @ a, 2.0 * n**3


def bench_train(repeats: int) -> None:
  """Train-step tokens/s and CPU-MFU of lcjax, and the ratio to transformers + torch.

  This machine may be shared, so a step can be slowed by a neighbour. The matmul peak,
  the lcjax step and the torch step are therefore timed in interleaved rounds, and each
  figure is the fastest of its `repeats` rounds (the least disturbed one), so the MFU
  and the ratio compare runs taken under the same conditions.
  """

  matmul, matmul_flops = _matmul(2048)
  torch_matmul, _ = _torch_matmul(2048)
  print(
    f"{'model':<30}{'params':>10}{'peak GF/s':>11}{'lcjax tok/s':>13}{'CPU-MFU':>9}"
    f"{'torch tok/s':>13}{'lcjax/torch':>13}{'torch peak GF/s':>17}"
  )
  for name, config in _train_configs().items():
    batch, T = config.train.batch_size, config.data.seq_len
    lcjax_step, n_params, cfg = _lcjax_step(config)
    torch_step, threads = _torch_step(cfg, batch, T)
    runs = dict(peak=matmul, lcjax=lcjax_step, torch=torch_step, torch_peak=torch_matmul)
    times = {key: [] for key in runs}
    for _ in range(repeats):
      for key, run in runs.items():
        start = time.perf_counter()
        run()
        times[key].append(time.perf_counter() - start)
    best = {key: min(ts) for key, ts in times.items()}
    peak = matmul_flops / best["peak"]
    tps_jax, tps_torch = batch * T / best["lcjax"], batch * T / best["torch"]
    mfu = flops_per_token(cfg, n_params, T) * tps_jax / peak
    torch_peak = matmul_flops / best["torch_peak"]
    print(
      f"{name:<30}{n_params:>10,}{peak / 1e9:>11.0f}{tps_jax:>13,.0f}{mfu:>9.1%}"
      f"{tps_torch:>13,.0f}{tps_jax / tps_torch:>12.2f}x{torch_peak / 1e9:>17.0f}"
    )
  print(
    f"(peak: float32 2048x2048 matmul through XLA, which MFU divides by; torch peak: the same "
    f"matmul through torch; torch {threads} threads, fp32, sdpa "
    f"attention, AdamW; lcjax fp32, blockwise attention, AdamW; fastest of {repeats} "
    "interleaved rounds)"
  )


def bench_attention(repeats: int) -> None:

  # Block density of each mask family from the Pallas kernels' tables (and, on an
  # accelerator, kernel TFLOP/s against jax.nn.dot_product_attention).
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_attention_blocks.py")
  spec = importlib.util.spec_from_file_location("bench_attention_blocks", path)
  blocks = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(blocks)
  blocks.main([])
  print()

  mask = MaskSpec(causal=True)
  print(
    f"{'T':>7}{'ref temp MiB':>14}{'blockwise MiB':>15}{'ratio':>8}{'ref ms':>9}"
    f"{'blockwise ms':>14}{'speedup':>9}  blockwise path   (fwd+bwd, B=1 H=4 D=64 fp32, "
    "block 512)"
  )
  for T in (1024, 2048, 4096, 16384):
    block = min(512, T)
    schedule = static_schedule(mask, T, T, block, block, 4)
    path = "unrolled" if fits_unrolled(schedule, 1, 4, block, block) else "loop"
    shape = (1, T, 4, 64)
    q = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)

    def loss(q, k, v, impl):
      return jnp.sum(dot_product_attention(q, k, v, mask=mask, impl=impl) ** 2)

    mem, ms = {}, {}
    for impl in ("reference", "blockwise"):
      f = jax.jit(jax.grad(lambda q, k, v, impl=impl: loss(q, k, v, impl), argnums=(0, 1, 2)))
      compiled = f.lower(q, q, q).compile()
      mem[impl] = compiled.memory_analysis().temp_size_in_bytes / 2**20
      if T <= 4096:
        compiled(q, q, q)
        ms[impl] = 1e3 * _median_time(
          lambda c=compiled, q=q: jax.block_until_ready(c(q, q, q)), repeats
        )
    ratio = mem["blockwise"] / mem["reference"]
    timing = (
      f"{ms['reference']:>9.1f}{ms['blockwise']:>14.1f}{ms['reference'] / ms['blockwise']:>8.2f}x"
      if ms
      else f"{'(compile only)':>32}"
    )
    print(f"{T:>7}{mem['reference']:>14.1f}{mem['blockwise']:>15.1f}{ratio:>8.4f}{timing}  {path}")


def _memory_config(T: int, context: int, **overrides):
  return load_config(
    f"configs/quickstart.py:seq_len={T}",
    {
      **overrides,
      "model.max_position_embeddings": T,
      "model.rope.max_position_embeddings": T,
      "model.remat": "full",
      "attention.block_q": 512,
      "attention.block_kv": 512,
      "train.batch_size": 1,
      "train.loss_chunk": 1024,
      "mesh.data": 1,
      "mesh.fsdp": 1,
      "mesh.tensor": 1,
      "mesh.context": context,
      "parallel.layout": "zigzag",
      "parallel.context_strategy": "ring",
    },
  )


def bench_memory() -> None:
  if jax.device_count() < 8:  # the mesh needs 8 devices: rerun with 8 fake CPU devices
    env = {
      **os.environ,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
      "JAX_PLATFORMS": "cpu",
    }
    subprocess.run([sys.executable, __file__, "memory"], env=env, check=True)
    return

  print("per-device memory of a training step (quickstart model, remat=full, batch 1, zigzag ring,")
  print("block 512; compiled memory_analysis on CPU devices):")
  print(f"{'T':>8}{'context':>9}{'tokens/dev':>12}{'temp MiB':>11}{'args MiB':>10}")
  temp = {}
  for T, W in ((8192, 1), (16384, 2), (32768, 4), (65536, 8), (65536, 1)):
    report = compile_train_step(_memory_config(T, W), devices=jax.devices()[:W])
    temp[T, W] = report["temp_bytes"] / 2**20
    print(f"{T:>8}{W:>9}{T // W:>12}{temp[T, W]:>11.1f}{report['argument_bytes'] / 2**20:>10.1f}")
  ratio = temp[65536, 8] / temp[8192, 1]
  print(f"T=64K over 8 devices: {ratio:.2f}x the per-device temp memory of T=8K on one device")
  print()
  _memory_by_depth()
  print()
  print("ring work imbalance (max device work / mean, summed over ring steps; causal, block 512):")
  print(f"{'W':>4}" + "".join(f"{layout:>12}" for layout in LAYOUTS))
  for W in (2, 4, 8):
    row = "".join(f"{work_imbalance(65536, W, layout, 512):>12.3f}" for layout in LAYOUTS)
    print(f"{W:>4}{row}")


def _memory_by_depth() -> None:
  """Temp memory vs depth, scanned and unrolled, and what remat=offload moves to host.

  T=8192 over context 8 (1K tokens per device). With `model.scan_layers` the layers
  are one loop body, so temp memory should stay flat as layers are added beyond what
  each layer's saved input costs; `offload` moves those inputs to pinned_host.
  """
  print("per-device memory vs depth (quickstart width, T=8192 over context 8, batch 1):")
  print(f"{'layers':>7}{'layout':>10}{'remat':>9}{'temp MiB':>10}{'host MiB':>10}")
  temp, host = {}, {}
  for layers in (2, 4, 8):
    for scan, remat in ((False, "full"), (True, "full"), (True, "offload")):
      config = _memory_config(
        8192, 8, **{"model.num_layers": layers, "model.scan_layers": scan, "model.remat": remat}
      )
      report = compile_train_step(config, devices=jax.devices()[:8])
      temp[layers, scan, remat] = report["temp_bytes"] / 2**20
      host[layers, scan, remat] = report["host_bytes_per_device"] / 2**20
      layout = "scanned" if scan else "unrolled"
      print(
        f"{layers:>7}{layout:>10}{remat:>9}{temp[layers, scan, remat]:>10.1f}"
        f"{host[layers, scan, remat]:>10.1f}"
      )
  for scan in (False, True):
    growth = temp[8, scan, "full"] / temp[2, scan, "full"]
    print(
      f"{'scanned' if scan else 'unrolled'} remat=full: 8 layers need {growth:.2f}x the temp of 2"
    )
  moved = host[8, True, "offload"]
  saved = temp[8, True, "full"] - temp[8, True, "offload"]
  if moved == 0 and abs(saved) < 0.05:
    print(
      "offload: XLA:CPU keeps the offloaded layer inputs on the device (0 MiB in pinned_host, "
      "temp as remat=full); the TPU compiles in the README's AOT table show what it moves"
    )
  else:
    print(f"offload at 8 layers: {moved:.1f} MiB in pinned_host, {saved:.1f} MiB less temp")


def _run_script(name: str) -> None:
  """Runs another benchmark script of this folder in its own process (its own flags)."""
  subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), name)], check=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument(
    "what", nargs="?", default="all", choices=("all", "train", "attention", "ssd", "memory")
  )
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()[0].device_kind}")
  if args.what in ("all", "train"):
    bench_train(args.repeats)
  if args.what in ("all", "attention"):
    bench_attention(args.repeats)
  if args.what in ("all", "ssd"):
    _run_script("bench_ssd.py")
  if args.what in ("all", "memory"):
    bench_memory()
  return 0


if __name__ == "__main__":
  sys.exit(main())
