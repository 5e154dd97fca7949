"""Attention implementations by name: the one table the dispatcher, the ring and the model read.

Each entry is an `AttentionImpl` of three functions over the bundled inputs
(`lcjax.attention.inputs`):

  attention(q, k, v, inputs, opts) -> (out_BTHD in q's dtype, lse_BHT fp32); differentiable
  forward(q, k, v, inputs, opts) -> (out_BTHD fp32, lse_BHT fp32)
  backward(q, k, v, out, lse, dout, inputs, opts, dlse=None) -> fp32 (dq, dk, dv)

`attention` is what `dot_product_attention(impl=NAME)` runs; `forward`/`backward` are
one ring step of context parallelism (`lcjax.parallel.ring`), which merges partial
results by their lse and runs the backward against the merged output
(FlashAttention-2 Alg. 1 and 2, Dao 2023). So every registered implementation also
runs under ring attention: the model passes the name it resolved, never a second
mapping of its own.

* reference: materialized scores (the oracle); its backward is FA-2's written densely.
* blockwise: pure JAX; the unrolled static schedule for rows in order, else the
  `fori_loop` over runtime block maps (which is also its ring step).
* pallas: the `pallas_kernels` block-sparse kernels (Mosaic on TPU, Triton on GPU,
  interpret mode on CPU).

An implementation may also say how ring attention accumulates gradients over its steps
(`GradAccumulation`): the Pallas dQ and dK/dV kernels add into float32 buffers in their
own layout, which they overwrite in place (dK, dV travel the ring in that layout). Without
one, the ring adds each step's `backward` (dq, dk, dv) in the callers' layout.

`auto` resolves per call: pallas on TPU/GPU, blockwise on CPU. The platform is the one
the inputs live on, unless a `with target_platform("tpu"):` block names the platform
being compiled for: an ahead-of-time compile for a TPU topology traces on the CPU host,
where the inputs' platform would pick blockwise (and run Pallas in interpret mode).
A new implementation is one `register_attention_impl(name, AttentionImpl(...))` call.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax

from lcjax.attention import blockwise, reference, unrolled
from lcjax.attention.inputs import AttentionOptions
from pallas_kernels.block_sparse_attention import attention_with_lse as pallas_with_lse
from pallas_kernels.block_sparse_attention import backward as pallas_backward
from pallas_kernels.block_sparse_attention import backward_accumulate as pallas_accumulate
from pallas_kernels.block_sparse_attention import (
  default_interpret,
  grad_accumulators,
  grads_from_accumulators,
)
from pallas_kernels.block_sparse_attention import forward as pallas_forward

__all__ = [
  "AUTO_IMPL",
  "AttentionImpl",
  "GradAccumulation",
  "IMPLS",
  "attention_impl",
  "impl_names",
  "register_attention_impl",
  "resolve_impl",
  "target_platform",
]


class GradAccumulation(NamedTuple):
  """How ring attention sums gradients over its steps, in an implementation's own layout.

  - init(q, k, opts) -> (dq_acc, dkv_acc); dkv_acc travels the ring with its keys.
  - step(q, k, v, out, lse, dout, inputs, opts, dq_acc, dkv_acc) -> (dq_acc, dkv_acc) adds
    one key chunk's gradients (FlashAttention-2 Alg. 2 against the merged out and lse).
  - finish(dq_acc, dkv_acc, q, k) -> (dq_BTHD, dk_BSKD, dv_BSKD), float32 or the input
    dtypes (the ring casts).
  """

  init: Callable
  step: Callable
  finish: Callable


class AttentionImpl(NamedTuple):
  """One attention implementation (see the module docstring for the three signatures)."""

  attention: Callable
  forward: Callable
  backward: Callable
  grad_accumulation: GradAccumulation | None = None


# platform -> what "auto" runs: the Pallas kernels on accelerators, the pure-JAX twin on
# CPU (where Pallas only runs in its slow interpret mode).
AUTO_IMPL = {"cpu": "blockwise", "tpu": "pallas", "gpu": "pallas", "cuda": "pallas"}
_interpret_notice_shown = False


# The platform an ahead-of-time compile targets; None: the inputs' own platform.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
  "lcjax_attention_target_platform", default=None
)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Within the block, "auto" and the Pallas kernels' backend follow `platform`.

  `lcjax.train.aot` traces a TPU topology's train step on the CPU host; without this,
  "auto" would see tracers on the default (CPU) backend and pick blockwise, and Pallas
  would run in interpret mode instead of lowering through Mosaic.
  """
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def _pallas_interpret() -> bool | None:
  """Pallas' `interpret=`: decided by q's platform (None), or by the target platform."""
  target = _TARGET_PLATFORM.get()
  return None if target is None else target == "cpu"


# Largest block the Triton lowering fits in an H200's 227 KiB of shared memory at head_dim
# 128: 128-blocks asked for 258-388 KiB (fp32 and bf16, GQA or not) and failed to launch;
# 64-blocks ran, and at T=8K dense causal bf16 fwd+bwd reached 60 TFLOP/s against 23 for
# 128-blocks without GQA (scripts/gpu_check.py, scripts/bench_attention_blocks.py on an
# H200, jax 0.11.2; README "Pallas kernels on a GPU").
GPU_MAX_BLOCK = 64
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _for_platform(q_BTHD, opts: AttentionOptions) -> AttentionOptions:
  """`opts` with blocks clipped to `GPU_MAX_BLOCK` when the kernels lower through Triton.

  Block sizes change only the order of float32 accumulation, not what is computed.
  """
  platform = _TARGET_PLATFORM.get() or _platform(q_BTHD)
  if platform not in GPU_PLATFORMS or max(opts.block_q, opts.block_kv) <= GPU_MAX_BLOCK:
    return opts
  return opts.replace(
    block_q=min(opts.block_q, GPU_MAX_BLOCK), block_kv=min(opts.block_kv, GPU_MAX_BLOCK)
  )


def _pallas_attention(q_BTHD, k_BSKD, v_BSKD, inputs, opts):
  """The kernels with interpret mode chosen per call, and a one-time notice on CPU."""
  global _interpret_notice_shown
  opts = _for_platform(q_BTHD, opts)
  interpret = _pallas_interpret()
  on_cpu = default_interpret(q_BTHD) if interpret is None else interpret
  if on_cpu and not _interpret_notice_shown:
    _interpret_notice_shown = True
    logging.getLogger(__name__).warning(
      "impl='pallas' on CPU runs the kernels in Pallas interpret mode (slow; for testing); "
      "impl='blockwise' is the fast CPU path"
    )
  return pallas_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret=interpret)


def _pallas_forward(q_BTHD, k_BSKD, v_BSKD, inputs, opts):
  """One ring step's forward kernel, for the target platform when one is set."""
  opts = _for_platform(q_BTHD, opts)
  return pallas_forward(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret=_pallas_interpret())


def _pallas_backward(q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse=None):
  """One ring step's dQ and dK/dV kernels, for the target platform when one is set."""
  opts = _for_platform(q_BTHD, opts)
  args = (q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse)
  return pallas_backward(*args, interpret=_pallas_interpret())


def _pallas_grads_init(q_BTHD, k_BSKD, opts):
  dq, dk, dv = grad_accumulators(q_BTHD, k_BSKD, _for_platform(q_BTHD, opts))
  return dq, (dk, dv)


def _pallas_grads_step(q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dq, dkv):
  """One ring step's dQ and dK/dV kernels, adding into the accumulators (target platform)."""
  opts = _for_platform(q_BTHD, opts)
  args = (q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, (dq, *dkv))
  dq, dk, dv = pallas_accumulate(*args, interpret=_pallas_interpret())
  return dq, (dk, dv)


def _pallas_grads_finish(dq, dkv, q_BTHD, k_BSKD):
  return grads_from_accumulators((dq, *dkv), q_BTHD, k_BSKD)


_PALLAS_GRADS = GradAccumulation(_pallas_grads_init, _pallas_grads_step, _pallas_grads_finish)

IMPLS: dict[str, AttentionImpl] = {
  "reference": AttentionImpl(
    reference.reference_with_lse, reference.reference_fwd, reference.reference_bwd
  ),
  "blockwise": AttentionImpl(unrolled.attention_with_lse, blockwise.forward, blockwise.backward),
  "pallas": AttentionImpl(_pallas_attention, _pallas_forward, _pallas_backward, _PALLAS_GRADS),
}


def register_attention_impl(name: str, impl: AttentionImpl) -> None:
  """Adds an implementation under `name` (for `impl=` and ring attention's steps)."""
  if not isinstance(impl, AttentionImpl):
    raise ValueError(f"register_attention_impl({name!r}) needs an AttentionImpl, got {impl!r}")
  if name in IMPLS or name == "auto":
    raise ValueError(f"attention impl {name!r} is already registered; pick another name")
  IMPLS[name] = impl


def impl_names() -> tuple[str, ...]:
  """Every value `impl=` / `attention.impl` accepts: "auto" and the registered names."""
  return ("auto", *IMPLS)


def _platform(x: jax.Array | None) -> str:
  """The platform x lives on, or the default backend's for tracers (decided per call)."""
  try:
    return next(iter(x.devices())).platform
  except (AttributeError, TypeError, jax.errors.ConcretizationTypeError):
    return jax.default_backend()


def resolve_impl(impl: str, x: jax.Array | None = None, *, platform: str | None = None) -> str:
  """The registered name `impl` runs as; "auto" is decided by platform, never at import.

  The platform is `platform` if given, else the one a `target_platform` block names
  (an ahead-of-time compile from a CPU host), else the one `x` lives on.
  """
  if impl not in impl_names():
    raise ValueError(f"attention impl {impl!r} is unknown; use one of {', '.join(impl_names())}")
  if impl != "auto":
    return impl
  return AUTO_IMPL.get(platform or _TARGET_PLATFORM.get() or _platform(x), "blockwise")


def attention_impl(name: str) -> AttentionImpl:
  """The implementation registered as `name` (not "auto": resolve it first)."""
  if name not in IMPLS:
    raise ValueError(
      f"attention impl {name!r} is unknown; use one of {', '.join(IMPLS)} (resolve 'auto' with "
      "resolve_impl)"
    )
  return IMPLS[name]
