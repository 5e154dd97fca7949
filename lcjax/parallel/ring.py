"""Context-parallel attention: ring attention and all-gather over the `context` mesh axis.

out_BTHD = ring_attention(q_BTHD, k_BSKD, v_BSKD, mask=MaskSpec(document=True),
                          q_segment_ids=seg_BT, q_index=token_index_BT, mesh=mesh)

Inputs are globally shaped [B, T, ...] arrays whose sequence dimension is split into W
equal chunks over the mesh axis `axis` (size W), already in the order of a layout
(`lcjax.parallel.layouts`: contiguous, zigzag or striped). Masks are evaluated on the
global token indices `q_index`/`kv_index` and on segment ids that travel with
their tokens, never on local shard offsets, so every `MaskSpec` (causal, document,
anchor, sliding window, sinks, strided blocks) means the same as on one device, in any
layout. A strided mask differs per kv head and is evaluated on the global kv-head
index, so it cannot be combined with `head_axis` (which would renumber the heads).

Strategies (`strategy=`):

* `ring` (RingAttention, Liu et al. 2023; Blockwise Parallel Transformer, Liu & Abbeel
  2023). Each device keeps its query chunk; the key/value chunks, with their positions
  and segment ids, travel the ring with `lax.ppermute` (device r sends to r + 1), so
  at step j device r holds the keys of device (r − j) mod W. Each step runs the forward
  of a registered attention implementation (`block_impl`, `lcjax.attention.registry`:
  pure-JAX `blockwise`, the `pallas` kernels, or the `reference`) that returns
  (out, lse), and the partial results are merged in float32 in LSE form (the
  online softmax of FlashAttention-2, Dao 2023):

    lse' = logaddexp(lse, lse_j),  out' = e^(lse − lse') · out + e^(lse_j − lse') · out_j.

  A (query chunk, key chunk) pair whose mask is empty — decided from the chunks'
  position and segment-id ranges, as `MaskSpec.block_map` decides for blocks — is
  skipped with `lax.cond`: no compute. Memory per device is O(T/W).
* `all_gather` (the Llama 3 context parallelism, Dubey et al. 2024): gather the keys
  and values (and their positions and segment ids) over `axis` and attend the local
  queries to all of them in one block-attention call. Simpler, one collective, but
  O(T) key/value memory per device.

Backward (`jax.custom_vjp` around the whole sharded computation; the FlashAttention-2
backward per step, computed against the *global* output and lse saved by the
forward). Ring: dQ accumulates locally; dK and dV of a key chunk accumulate in
float32 buffers that travel the ring with that chunk and, after W hops, arrive at the
chunk's owner (Liu et al. 2023). All-gather: the keys are gathered again and dK, dV
are reduce-scattered back (`lax.psum_scatter`).

Load balance under a causal mask depends on the layout; `layouts.work_imbalance`
counts it. Zigzag and striped skip the empty halves inside a chunk pair through the
block impl's own block skipping.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from lcjax.attention.blockwise import visited_block_pairs
from lcjax.attention.inputs import AttentionOptions, MaskInputs, check_qkv, mask_inputs
from lcjax.attention.masks import EMPTY, MaskSpec
from lcjax.attention.registry import IMPLS, AttentionImpl, GradAccumulation

__all__ = [
  "STRATEGIES",
  "ring_attention",
  "ring_attention_stats",
]

STRATEGIES = ("ring", "all_gather")


class _Static(NamedTuple):
  """Everything static about one call; hashable, so it is a jit static argument."""

  mesh: Mesh | AbstractMesh
  axis: str
  batch_axes: tuple[str, ...]
  head_axis: str | None
  strategy: str
  impl: AttentionImpl  # its forward / backward run each step (`lcjax.attention.registry`)
  opts: AttentionOptions
  kv_heads: int  # Hkv, for masks that differ per kv head (strided, `MaskSpec.per_head`)

  @property
  def mask(self) -> MaskSpec:
    return self.opts.mask

  @property
  def ring_size(self) -> int:
    return self.mesh.shape[self.axis]

  def rows_spec(self) -> PartitionSpec:  # [B, T, H, D]
    return PartitionSpec(self.batch_axes or None, self.axis, self.head_axis, None)

  def tokens_spec(self) -> PartitionSpec:  # [B, T]
    return PartitionSpec(self.batch_axes or None, self.axis)

  def lse_spec(self) -> PartitionSpec:  # [B, H, T]
    return PartitionSpec(self.batch_axes or None, self.head_axis, self.axis)

  def ids_spec(self) -> MaskInputs:  # every field [B, T] (None fields stay None)
    return MaskInputs(*(self.tokens_spec(),) * 4)


def _shard_map(st: _Static, body, args, in_specs, out_specs):
  """`jax.shard_map` over st.mesh of `body(*args)`, passing None leaves (absent segment
  ids in a `MaskInputs`) through; `in_specs` mirrors `args` leaf for leaf.

  check_vma=False: the body's loop carries start as fresh (device-invariant) zeros and
  Pallas calls do not carry varying-axis types; MaxText makes the same choice.
  """
  is_none = lambda x: x is None  # noqa: E731
  leaves, tree = jax.tree.flatten(args, is_leaf=is_none)
  spec_leaves = tree.flatten_up_to(in_specs)
  present = tuple(x is not None for x in leaves)

  def local(*xs):
    it = iter(xs)
    return body(*jax.tree.unflatten(tree, [next(it) if p else None for p in present]))

  return jax.shard_map(
    local,
    mesh=st.mesh,
    in_specs=tuple(s for s, p in zip(spec_leaves, present, strict=True) if p),
    out_specs=out_specs,
    check_vma=False,
  )(*(x for x in leaves if x is not None))


def _send_to_next(tree, st: _Static):
  """Every array of `tree` moves one device along the ring: r -> r + 1 (mod W)."""
  W = st.ring_size
  perm = [(r, (r + 1) % W) for r in range(W)]
  return jax.tree.map(lambda x: lax.ppermute(x, st.axis, perm), tree)


def _chunk_block_map(st: _Static, ids: MaskInputs, block_q: int, block_kv: int):
  """The block map of a chunk pair ([B, Hkv, nQ, nK] for a per-head mask)."""
  return st.mask.block_map(*ids, block_q=block_q, block_kv=block_kv, num_kv_heads=st.kv_heads)


def _chunk_visible(st: _Static, ids: MaskInputs) -> jax.Array:
  """False iff no (query, key) pair of the two chunks is allowed, in any batch row (or
  kv head).

  One block the size of each chunk: O(T/W) work from index and segment-id ranges.
  """
  T, S = ids.q_index.shape[1], ids.kv_index.shape[1]
  return (_chunk_block_map(st, ids, T, S) != EMPTY).any()


def _travelling(k, v, ids: MaskInputs):
  """What moves along the ring with a key chunk: its keys, values, indices and segments."""
  return k, v, ids.kv_index, ids.kv_segment_ids


def _with_keys(ids: MaskInputs, kv) -> MaskInputs:
  """The mask inputs of these queries against the key chunk `kv` (from `_travelling`)."""
  return ids._replace(kv_index=kv[2], kv_segment_ids=kv[3])


def _merge(out_BTHD, lse_BHT, out_j_BTHD, lse_j_BHT):
  """LSE-form online-softmax merge of two partial attentions over disjoint key sets (fp32)."""
  lse_new_BHT = jnp.logaddexp(lse_BHT, lse_j_BHT)
  # Rows that have seen no visible key yet keep lse -inf; shift by 0 so both weights are 0.
  shift_BHT = jnp.where(jnp.isfinite(lse_new_BHT), lse_new_BHT, 0.0)
  w_BTH1 = jnp.exp(lse_BHT - shift_BHT).transpose(0, 2, 1)[..., None]
  w_j_BTH1 = jnp.exp(lse_j_BHT - shift_BHT).transpose(0, 2, 1)[..., None]
  return w_BTH1 * out_BTHD + w_j_BTH1 * out_j_BTHD, lse_new_BHT


def _ring_forward_local(st: _Static, q, k, v, ids: MaskInputs, count_blocks=False):
  """One device's ring forward: (out_BTHD fp32, lse_BHT, chunk pairs, block pairs computed)."""
  B, T, H, D = q.shape

  def attend(acc, kv):
    out_BTHD, lse_BHT, chunks, blocks = acc
    chunk_ids = _with_keys(ids, kv)

    def compute():
      out_j, lse_j = st.impl.forward(q, kv[0], kv[1], chunk_ids, st.opts)
      n_blocks = blocks
      if count_blocks:
        bq, bk = min(st.opts.block_q, T), min(st.opts.block_kv, kv[0].shape[1])
        n_blocks += visited_block_pairs(_chunk_block_map(st, chunk_ids, bq, bk))
      return *_merge(out_BTHD, lse_BHT, out_j, lse_j), chunks + 1, n_blocks

    return lax.cond(_chunk_visible(st, chunk_ids), compute, lambda: acc)

  def step(carry, _):
    acc, kv = carry
    return (attend(acc, kv), _send_to_next(kv, st)), None

  acc = (
    jnp.zeros((B, T, H, D), jnp.float32),
    jnp.full((B, H, T), -jnp.inf, jnp.float32),
    jnp.int32(0),
    jnp.int32(0),
  )
  # W − 1 hops bring every key chunk past every device; the last step needs no send.
  (acc, kv), _ = lax.scan(step, (acc, _travelling(k, v, ids)), length=st.ring_size - 1)
  return attend(acc, kv)


def _grad_accumulation(st: _Static) -> GradAccumulation:
  """The implementation's gradient accumulation, or sums of its `backward` in [B, T, H, D]."""
  if st.impl.grad_accumulation is not None:
    return st.impl.grad_accumulation

  def init(q, k, opts):
    zeros_BSKD = jnp.zeros(k.shape, jnp.float32)
    return jnp.zeros(q.shape, jnp.float32), (zeros_BSKD, zeros_BSKD)

  def step(q, k, v, out, lse, dout, ids, opts, dq_BTHD, dkv):
    dq_j, dk_j, dv_j = st.impl.backward(q, k, v, out, lse, dout, ids, opts)
    return dq_BTHD + dq_j, (dkv[0] + dk_j, dkv[1] + dv_j)

  return GradAccumulation(init, step, lambda dq, dkv, q, k: (dq, *dkv))


def _ring_backward_local(st: _Static, q, k, v, ids: MaskInputs, out, lse, dout):
  """One device's ring backward: (dq, dk, dv) of its own chunks, in the input dtypes.

  Gradients accumulate over the steps in the implementation's layout (`GradAccumulation`:
  the Pallas kernels add into float32 buffers in place, transposed once at the end); the
  dK, dV of a key chunk travel with it (Liu et al. 2023) until they arrive home.
  """
  grads = _grad_accumulation(st)

  def attend(dq_acc, kv, dkv):
    chunk_ids = _with_keys(ids, kv)

    def compute():
      return grads.step(q, kv[0], kv[1], out, lse, dout, chunk_ids, st.opts, dq_acc, dkv)

    return lax.cond(_chunk_visible(st, chunk_ids), compute, lambda: (dq_acc, dkv))

  def step(carry, _):
    dq_acc, kv, dkv = carry
    dq_acc, dkv = attend(dq_acc, kv, dkv)
    kv, dkv = _send_to_next((kv, dkv), st)
    return (dq_acc, kv, dkv), None

  dq_acc, dkv = grads.init(q, k, st.opts)
  carry = (dq_acc, _travelling(k, v, ids), dkv)
  (dq_acc, kv, dkv), _ = lax.scan(step, carry, length=st.ring_size - 1)
  dq_acc, dkv = attend(dq_acc, kv, dkv)
  # The W-th hop brings each dK, dV buffer home to the device that owns its keys.
  dq, dk, dv = grads.finish(dq_acc, _send_to_next(dkv, st), q, k)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _gather_kv(st: _Static, k, v, ids: MaskInputs):
  """(keys, values, mask inputs against every key of the row), in layout order."""
  gathered = jax.tree.map(
    lambda x: lax.all_gather(x, st.axis, axis=1, tiled=True), _travelling(k, v, ids)
  )
  return gathered[0], gathered[1], _with_keys(ids, gathered)


def _gathered_forward_local(st: _Static, q, k, v, ids: MaskInputs):
  k_all, v_all, all_ids = _gather_kv(st, k, v, ids)
  return st.impl.forward(q, k_all, v_all, all_ids, st.opts)


def _gathered_backward_local(st: _Static, q, k, v, ids: MaskInputs, out, lse, dout):
  k_all, v_all, all_ids = _gather_kv(st, k, v, ids)
  dq, dk_all, dv_all = st.impl.backward(q, k_all, v_all, out, lse, dout, all_ids, st.opts)
  # Every device holds a part of every key's gradient: sum them, each keeps its chunk.
  dk, dv = (lax.psum_scatter(x, st.axis, scatter_dimension=1, tiled=True) for x in (dk_all, dv_all))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _forward(st: _Static, q, k, v, ids: MaskInputs):
  """The sharded forward on global arrays: (out_BTHD float32, lse_BHT)."""
  rows = st.rows_spec()
  in_specs = (rows, rows, rows, st.ids_spec())
  if st.strategy == "ring":
    body = lambda *a: _ring_forward_local(st, *a)[:2]
  else:
    body = functools.partial(_gathered_forward_local, st)
  return _shard_map(st, body, (q, k, v, ids), in_specs, (rows, st.lse_spec()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, ids: MaskInputs):
  out_BTHD, _ = _forward(st, q, k, v, ids)
  return out_BTHD.astype(q.dtype)


def _attention_fwd(st, q, k, v, ids: MaskInputs):
  out_BTHD, lse_BHT = _forward(st, q, k, v, ids)
  # Residuals are sharded like the inputs: O(T/W) per device, never a score block. The
  # output is kept in the input dtype, as FlashAttention-2 keeps O for its backward's
  # Delta = rowsum(dO ∘ O) (Dao 2023, Alg. 2 line 4): a float32 copy is a q-sized buffer.
  out_in_dtype = out_BTHD.astype(q.dtype)
  return out_in_dtype, (q, k, v, ids, out_in_dtype, lse_BHT)


def _attention_bwd(st, res, dout_BTHD):
  rows = st.rows_spec()
  in_specs = (rows, rows, rows, st.ids_spec(), rows, st.lse_spec(), rows)
  local = _ring_backward_local if st.strategy == "ring" else _gathered_backward_local
  body = functools.partial(local, st)
  dq, dk, dv = _shard_map(st, body, (*res, dout_BTHD), in_specs, (rows, rows, rows))
  return dq, dk, dv, None  # integer mask inputs take no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def _axis_tuple(axes) -> tuple[str, ...]:
  """None -> (), 'data' -> ('data',), ('data', 'fsdp') -> itself."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _static(q_BTHD, k_BSKD, v_BSKD, opts, mesh, axis, batch_axes, head_axis, strategy, block_impl):
  """Validates the call before tracing; each error is one sentence naming the argument."""
  if strategy not in STRATEGIES:
    raise ValueError(
      f"strategy={strategy!r} is not a context-parallel strategy; use one of {STRATEGIES}"
    )
  if isinstance(block_impl, str):
    if block_impl not in IMPLS:
      raise ValueError(
        f"block_impl={block_impl!r} is unknown; use one of {', '.join(IMPLS)} "
        "(lcjax.attention.registry) or an AttentionImpl"
      )
    block_impl = IMPLS[block_impl]
  elif not isinstance(block_impl, AttentionImpl):
    raise ValueError(
      f"block_impl must be a registered attention impl name or an AttentionImpl, got {block_impl!r}"
    )
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError(
        "ring_attention needs a mesh: pass mesh= (see lcjax.parallel.make_mesh) or call it "
        "inside `with jax.set_mesh(mesh):`"
      )
  if not isinstance(mesh, Mesh | AbstractMesh):
    raise ValueError(
      f"mesh must be a jax.sharding.Mesh (see lcjax.parallel.make_mesh), got {type(mesh).__name__}"
    )
  batch_axes = _axis_tuple(batch_axes)
  named = [("axis", axis)] + [("batch_axes", a) for a in batch_axes]
  named += [] if head_axis is None else [("head_axis", head_axis)]
  for name, value in named:
    if value not in mesh.axis_names:
      raise ValueError(f"{name}={value!r} is not an axis of the mesh; use one of {mesh.axis_names}")
  used = [a for a in (axis, head_axis, *batch_axes) if a is not None]
  if len(set(used)) != len(used):
    raise ValueError(f"axis, head_axis and batch_axes must name different mesh axes, got {used}")
  check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  W = mesh.shape[axis]
  for name, length in (("query", T), ("key", S)):
    if length % W:
      raise ValueError(
        f"{name} length {length} is not divisible by the {axis!r} axis size {W}; pad the "
        f"sequence or change mesh.{axis}"
      )
  rows = math.prod(mesh.shape[a] for a in batch_axes)
  if B % rows:
    raise ValueError(
      f"batch {B} is not divisible by the {rows} devices of batch_axes={batch_axes}; change "
      "the batch size or batch_axes"
    )
  heads = 1 if head_axis is None else mesh.shape[head_axis]
  if Hkv % heads:
    raise ValueError(
      f"{Hkv} kv heads are not divisible by head_axis={head_axis!r} of size {heads}; use "
      "head_axis=None or a smaller axis"
    )
  if opts.mask.per_head and head_axis is not None:
    # Each device would see local kv heads 0.. and take the phases of the first heads.
    raise ValueError(
      f"a strided MaskSpec (stride={opts.mask.stride}) differs per kv head, which head_axis="
      f"{head_axis!r} would renumber on each device; use head_axis=None"
    )
  opts = opts.replace(scale=opts.score_scale(D))
  return _Static(mesh, axis, batch_axes, head_axis, strategy, block_impl, opts, Hkv)


@functools.partial(jax.jit, static_argnums=(0,))
def _run(st: _Static, q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs):
  B, T, S = q_BTHD.shape[0], q_BTHD.shape[1], k_BSKD.shape[1]
  return _attention(st, q_BTHD, k_BSKD, v_BSKD, inputs.resolve(st.mask, B, T, S))


@functools.partial(jax.jit, static_argnums=(0,))
def _run_stats(st: _Static, q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs):
  B, T, S = q_BTHD.shape[0], q_BTHD.shape[1], k_BSKD.shape[1]

  def body(q, k, v, ids):
    _, _, chunks, blocks = _ring_forward_local(st, q, k, v, ids, count_blocks=True)
    return chunks.reshape(1, 1), blocks.reshape(1, 1)

  rows = st.rows_spec()
  in_specs = (rows, rows, rows, st.ids_spec())
  counts_spec = PartitionSpec(st.batch_axes or None, st.axis)
  args = (q_BTHD, k_BSKD, v_BSKD, inputs.resolve(st.mask, B, T, S))
  chunks, blocks = _shard_map(st, body, args, in_specs, (counts_spec, counts_spec))
  return {"chunk_pairs": chunks, "block_pairs": blocks}


def ring_attention(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  *,
  mask: MaskSpec,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_index: jax.Array | None = None,
  kv_index: jax.Array | None = None,
  mesh: Mesh | AbstractMesh | None = None,
  axis: str = "context",
  batch_axes: str | tuple[str, ...] | None = None,
  head_axis: str | None = None,
  strategy: str = "ring",
  block_impl: str | AttentionImpl = "blockwise",
  scale: float | None = None,
  block_q: int = 512,
  block_kv: int = 512,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
) -> jax.Array:
  """Attention over a sequence split across `axis`: `dot_product_attention` for long rows.

  Args:
    q_BTHD, k_BSKD, v_BSKD, mask, q_segment_ids, kv_segment_ids, q_index, kv_index,
      scale: as in `lcjax.attention.dot_product_attention`, on the global arrays in
      layout order. The indices are the mask indices: each token's index in the
      original row (`apply_layout`'s `token_index`), which default to arange (the
      contiguous layout); `q_positions`/`kv_positions` are their deprecated names.
      Segment ids are needed by `document` masks.
    mesh: the device mesh (`lcjax.parallel.make_mesh`); default the mesh set with
      `jax.set_mesh`. T and S are split over `axis`.
    axis: the mesh axis of the sequence split (the ring), size W; W must divide T, S.
    batch_axes: mesh axes the batch rows are split over, e.g. ('data', 'fsdp');
      default none (rows replicated over the other axes).
    head_axis: a mesh axis the heads are split over (e.g. 'tensor'), default none.
    strategy: "ring" (K/V travel the ring) or "all_gather" (K/V gathered once).
    block_impl: the per-step attention routine: a name registered in
      `lcjax.attention.registry` ("blockwise", "pallas" — whose blocks must be multiples
      of 8 — or "reference") or an `AttentionImpl`.
    block_q, block_kv: block sizes of the block impl inside a device's chunk.

  Returns out_BTHD in q's dtype, sharded like q. Differentiable (custom VJP, see the
  module docstring); works under jit or eagerly. Bad arguments raise before tracing.
  """
  opts = AttentionOptions(mask, scale, block_q, block_kv)
  inputs = mask_inputs(
    "ring_attention", q_segment_ids, kv_segment_ids, q_index, kv_index, q_positions, kv_positions
  )
  st = _static(
    q_BTHD, k_BSKD, v_BSKD, opts, mesh, axis, batch_axes, head_axis, strategy, block_impl
  )
  return _run(st, q_BTHD, k_BSKD, v_BSKD, inputs)


def ring_attention_stats(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  *,
  mesh: Mesh | AbstractMesh | None = None,
  axis: str = "context",
  batch_axes: str | tuple[str, ...] | None = None,
  head_axis: str | None = None,
  block_impl: str | AttentionImpl = "blockwise",
  **attention_kwargs,
) -> dict[str, jax.Array]:
  """Work done by the ring forward, counted inside its compute branch (a debug stat).

  Takes `ring_attention`'s arguments (the strategy is "ring"); `attention_kwargs` are
  its mask, segment ids, indices, scale and block sizes. Returns int32 arrays [R, W]
  (R = devices over batch_axes, W = ring size), one entry per device: "chunk_pairs",
  the ring steps whose (query chunk, key chunk) pair was computed rather than skipped,
  and "block_pairs", the (q block, kv block) pairs the blockwise impl visits inside
  them (what `layouts.ring_work` predicts).
  """
  kw = dict(attention_kwargs)
  opts = AttentionOptions(
    kw.pop("mask"), kw.pop("scale", None), kw.pop("block_q", 512), kw.pop("block_kv", 512)
  )
  inputs = mask_inputs("ring_attention_stats", **kw)
  st = _static(q_BTHD, k_BSKD, v_BSKD, opts, mesh, axis, batch_axes, head_axis, "ring", block_impl)
  return _run_stats(st, q_BTHD, k_BSKD, v_BSKD, inputs)
