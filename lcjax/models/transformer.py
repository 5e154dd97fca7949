"""Llama-family decoder (Llama, Mistral, Qwen2) in Flax NNX.

One model covers the family through flags: grouped-query attention, qkv bias
(Qwen2), tied embeddings, explicit head_dim, sliding-window layers (Mistral)
and a per-layer `layer_types` pattern for hybrids, including LongGen's sink + window
sparse layers around full-attention middle layers (Ge et al. 2024, "A Little Goes a
Long Way: Efficient Long Context Training and Inference with Partial Contexts"). The
forward pass matches Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` /
`Qwen2ForCausalLM` in float32 (tests/test_hf_interop.py).

Attention masks come from the batch: `segment_ids` (packed documents) and the
token's index in the row. RoPE uses `positions`, which may restart per document
(Megatron-LM's `--reset-position-ids`) or stay global (ProLong, AnchorAttention);
masking never reads them.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.attention import AttentionOptions, MaskInputs, MaskSpec, attention_impl, resolve_impl
from lcjax.models.config import (
  head_dim,
  layer_types,
  mamba_mixer_config,
  scan_layers_enabled,
  validate_model_config,
)
from lcjax.models.layers import (
  RMSNorm,
  SwiGLU,
  dense,
  output_head,
  resolve_dtype,
  token_embedding,
  vocab_logits,
)
from lcjax.models.mamba2 import Mamba2Mixer
from lcjax.models.remat import checkpoint_policy, remat, tag_layer_input
from lcjax.parallel.mesh import (
  ACTIVATION_BTD,
  ACTIVATION_BTHD,
  ACTIVATION_BTKD,
  BATCH_AXES,
  constrain,
  mesh_axis_size,
)
from lcjax.parallel.ring import ring_attention
from lcjax.positional.rope import (
  apply_rope,
  cos_sin_for_positions,
  query_scale,
  query_scale_layers,
)

__all__ = ["DecoderLM", "KVCache", "RopeTables"]


class RopeTables(NamedTuple):
  """Per-call RoPE inputs shared by every layer (computed once, in float32).

  `q_scale_BT` is the entropy-aware ABF query scale, else None; a layer that does not apply
  it gets these tables through `layer_rope` (without it, or with a scale of 1 in a scan).
  """

  cos_BTK: jax.Array
  sin_BTK: jax.Array
  q_scale_BT: jax.Array | None


def layer_rope(rope: RopeTables, scaled: bool | jax.Array | None) -> RopeTables:
  """The RoPE inputs of one layer: `rope` without the query scale where `scaled` is False.

  `scaled` is a Python bool in the unrolled loop (the scale is dropped) or a traced per-layer
  bool inside the scan over layers, where the layer index is data and the same body must serve
  every layer: there the scale becomes 1, and `q * 1.0` is `q` bit for bit, so both paths give
  the same logits. None means every layer scales (or there is no scale).
  """
  if rope.q_scale_BT is None or scaled is None or scaled is True:
    return rope
  if scaled is False:
    return rope._replace(q_scale_BT=None)
  return rope._replace(q_scale_BT=jnp.where(scaled, rope.q_scale_BT, jnp.float32(1.0)))


class KVCache(NamedTuple):
  """Keys/values of one layer for decoding; slots past the write index hold zeros."""

  k_BSKD: jax.Array
  v_BSKD: jax.Array


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE (HF `LlamaAttention`)."""

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    d, hd, std = cfg.d_model, head_dim(cfg), cfg.initializer_range
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.impl = cfg.attention_impl
    self.context_strategy = cfg.context_strategy
    self.block_q, self.block_kv = cfg.attention_block_q, cfg.attention_block_kv
    qkv = dict(bias=cfg.qkv_bias, dtype=dtype, init_std=std, rngs=rngs)
    self.q_proj = dense(d, cfg.num_heads * hd, **qkv)
    self.k_proj = dense(d, cfg.num_kv_heads * hd, **qkv)
    self.v_proj = dense(d, cfg.num_kv_heads * hd, **qkv)
    self.o_proj = dense(
      cfg.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype, init_std=std, rngs=rngs
    )

  def __call__(
    self,
    x_BTD: jax.Array,
    rope: RopeTables,
    *,
    mask: MaskSpec,
    segment_ids_BT: jax.Array | None,
    q_index_BT: jax.Array | None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, KVCache | None]:
    B, T, _ = x_BTD.shape
    q_BTHD = constrain(
      self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim), ACTIVATION_BTHD
    )
    k_BTKD = constrain(
      self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim), ACTIVATION_BTKD
    )
    v_BTKD = constrain(
      self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim), ACTIVATION_BTKD
    )
    q_BTHD = apply_rope(q_BTHD, rope.cos_BTK, rope.sin_BTK)
    k_BTKD = apply_rope(k_BTKD, rope.cos_BTK, rope.sin_BTK)
    if rope.q_scale_BT is not None:
      q_BTHD = (q_BTHD * rope.q_scale_BT[:, :, None, None]).astype(q_BTHD.dtype)

    in_order = q_index_BT is None  # no layout permutation: mask positions are arange(T)
    if in_order:
      q_index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kv_index_BS, kv_segment_ids = q_index_BT, segment_ids_BT
    if cache is not None:
      if segment_ids_BT is not None:
        raise ValueError("decoding with a KV cache takes one document per row; drop segment_ids")
      # Keys are cached after RoPE, as in HF; the new rows go at `cache_index`.
      k_BTKD = jax.lax.dynamic_update_slice_in_dim(cache.k_BSKD, k_BTKD, cache_index, axis=1)
      v_BTKD = jax.lax.dynamic_update_slice_in_dim(cache.v_BSKD, v_BTKD, cache_index, axis=1)
      cache = KVCache(k_BTKD, v_BTKD)
      # Causal masking by index hides the still-empty slots after the write.
      kv_index_BS = jnp.broadcast_to(jnp.arange(k_BTKD.shape[1]), (B, k_BTKD.shape[1]))
    name = resolve_impl(self.impl, q_BTHD)
    opts = AttentionOptions(mask, block_q=self.block_q, block_kv=self.block_kv)
    context_mesh = _context_mesh() if cache is None else None
    if context_mesh is None and cache is None and name == "pallas":
      # Mosaic/Triton kernels cannot be partitioned by GSPMD: under any multi-device mesh
      # they run inside the ring's shard_map, a one-step ring when context is 1.
      context_mesh = _multi_device_mesh()
    if context_mesh is not None:
      out_BTHD = self._context_parallel(
        context_mesh, name, q_BTHD, k_BTKD, v_BTKD, opts, segment_ids_BT, q_index_BT
      )
      return self._out(out_BTHD), cache
    # None indices tell the attention that rows are in order, so its block schedule is
    # static (the unrolled CPU path); otherwise they are data.
    static = in_order and cache is None
    inputs = MaskInputs(
      None if static else q_index_BT,
      None if static else kv_index_BS,
      segment_ids_BT,
      kv_segment_ids,
    )
    out_BTHD, _ = attention_impl(name).attention(q_BTHD, k_BTKD, v_BTKD, inputs, opts)
    return self._out(out_BTHD), cache

  def _out(self, out_BTHD: jax.Array) -> jax.Array:
    B, T = out_BTHD.shape[:2]
    out_BTHD = constrain(out_BTHD, ACTIVATION_BTHD)
    return constrain(self.o_proj(out_BTHD.reshape(B, T, -1)), ACTIVATION_BTD)

  def _context_parallel(self, mesh, name, q_BTHD, k_BTKD, v_BTKD, opts, segment_ids_BT, index_BT):
    """Ring (or all-gather) attention over the mesh's 'context' axis (Liu et al. 2023).

    Each ring step runs the forward and backward of the implementation `name` resolved
    to (`lcjax.attention.registry`): the Pallas kernels on TPU/GPU under "auto", the
    pure-JAX blockwise loop on CPU, or whatever `attention.impl` names.
    """
    tensor = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and self.num_kv_heads % tensor == 0 else None
    if opts.mask.per_head:  # a strided mask is defined on global kv-head indices
      head_axis = None
    return ring_attention(
      q_BTHD,
      k_BTKD,
      v_BTKD,
      mask=opts.mask,
      q_segment_ids=segment_ids_BT,
      kv_segment_ids=segment_ids_BT,
      q_index=index_BT,
      kv_index=index_BT,
      batch_axes=BATCH_AXES,
      head_axis=head_axis,
      strategy=self.context_strategy,
      block_impl=name,
      block_q=opts.block_q,
      block_kv=opts.block_kv,
    )


def _multi_device_mesh():
  """The mesh set with `jax.set_mesh` when it has more than one device, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def _context_mesh():
  """The mesh set with `jax.set_mesh` when its 'context' axis has more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or dict(mesh.shape).get("context", 1) <= 1:
    return None
  return mesh


def _layer_mask_fields(cfg, layer_type: str) -> dict:
  """The `MaskSpec` fields of a layer type beyond causal/document/anchor: none for full,
  Mistral's window for sliding, LongGen's sparse_window + sparse_sinks for
  sink_window_attention, and the S2 strided pattern + sinks for strided_attention."""
  if layer_type == "sliding_attention":
    return dict(window=cfg.sliding_window)
  if layer_type == "sink_window_attention":
    return dict(window=cfg.sparse_window, sinks=cfg.sparse_sinks)
  if layer_type == "strided_attention":
    return dict(
      stride=cfg.sparse_stride,
      stride_block=cfg.sparse_block,
      local_blocks=cfg.sparse_local_blocks,
      sinks=cfg.sparse_sinks,
    )
  return {}


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)) (HF `LlamaDecoderLayer`)."""

  def __init__(self, cfg, layer_type: str, *, dtype, rngs: nnx.Rngs):
    self.layer_type = layer_type
    # The layer's window, sinks or strided pattern (`MaskSpec` fields).
    self.mask_fields = tuple(sorted(_layer_mask_fields(cfg, layer_type).items()))
    self.input_layernorm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
    # A hybrid stack's "mamba2" layers replace attention by a Mamba-2 mixer (Jamba-style:
    # mixer + MLP per block); every other layer type is attention.
    mamba = layer_type == "mamba2"
    self.self_attn = None if mamba else Attention(cfg, dtype=dtype, rngs=rngs)
    self.mixer = Mamba2Mixer(mamba_mixer_config(cfg), dtype=dtype, rngs=rngs) if mamba else None
    self.post_attention_layernorm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
    self.mlp_chunk = cfg.get("mlp_chunk", 0)
    self.mlp = SwiGLU(
      cfg.d_model,
      cfg.mlp_dim,
      bias=cfg.mlp_bias,
      dtype=dtype,
      init_std=cfg.initializer_range,
      rngs=rngs,
    )

  def __call__(self, x_BTD, rope, *, anchor, segment_ids_BT, q_index_BT, cache, cache_index):
    x_BTD = tag_layer_input(constrain(x_BTD, ACTIVATION_BTD))
    if self.mixer is not None:
      mixed_BTD, cache = self.mixer(
        self.input_layernorm(x_BTD), segment_ids_BT=segment_ids_BT, cache=cache
      )
      x_BTD = x_BTD + mixed_BTD.astype(x_BTD.dtype)
      return x_BTD + self._mlp(x_BTD), cache
    mask = MaskSpec(
      causal=True,
      document=segment_ids_BT is not None,
      anchor=anchor,
      **dict(self.mask_fields),
    )
    attn_BTD, cache = self.self_attn(
      self.input_layernorm(x_BTD),
      rope,
      mask=mask,
      segment_ids_BT=segment_ids_BT,
      q_index_BT=q_index_BT,
      cache=cache,
      cache_index=cache_index,
    )
    x_BTD = x_BTD + attn_BTD
    mlp_BTD = constrain(self._mlp(x_BTD), ACTIVATION_BTD)
    return constrain(x_BTD + mlp_BTD, ACTIVATION_BTD), cache

  def _mlp(self, x_BTD):
    """mlp(norm(x)), over chunks of `mlp_chunk` tokens when set (`token_chunks`)."""
    fn = lambda h_BTD: self.mlp(self.post_attention_layernorm(h_BTD))  # noqa: E731
    if not self.mlp_chunk:
      return fn(x_BTD)
    return token_chunks(fn, x_BTD, self.mlp_chunk)


def token_chunks(fn, x_BTD: jax.Array, chunk: int) -> jax.Array:
  """fn(x) for a token-wise fn, run over chunks of `chunk` tokens of each context shard.

  A SwiGLU MLP's intermediates are [B, T, 2F] per chip: 3.5 GiB in bf16 for Llama-3-8B
  at 128K tokens per chip, where the layer's input is 1 GiB. Chunking the tokens
  (MaxText's chunked MLP; MEMO, Zhao et al. 2025, §3) caps them at [B, chunk, 2F]. The
  chunks are taken inside each 'context' shard (the sequence is split contiguously
  over the shards in the array's order), so every chip works on its own tokens and
  the scan over chunks moves nothing between chips. Each chunk is rematerialized
  (`jax.checkpoint`), so the backward keeps only the chunk inputs. A shard whose length
  is no multiple of `chunk` is padded with zero tokens whose outputs are dropped; the
  result equals fn(x) (tests/test_scan_layers.py).
  """
  B, T, D = x_BTD.shape
  shards = mesh_axis_size("context")
  if T % shards:
    return fn(x_BTD)
  local = T // shards
  if local <= chunk:
    return fn(x_BTD)
  n = -(-local // chunk)
  x_BSLD = x_BTD.reshape(B, shards, local, D)
  if n * chunk != local:
    x_BSLD = jnp.pad(x_BSLD, ((0, 0), (0, 0), (0, n * chunk - local), (0, 0)))
  # [n, B, S, chunk, D]: the scan runs over the chunk index, each step over every shard.
  x_NBSCD = x_BSLD.reshape(B, shards, n, chunk, D).transpose(2, 0, 1, 3, 4)

  def one_chunk(_, xc_BSCD):
    xc_BTD = constrain(xc_BSCD.reshape(B, shards * chunk, D), ACTIVATION_BTD)
    y_BTD = constrain(fn(xc_BTD), ACTIVATION_BTD)
    return None, y_BTD.reshape(B, shards, chunk, -1)

  _, y_NBSCD = jax.lax.scan(jax.checkpoint(one_chunk, prevent_cse=False), None, x_NBSCD)
  y_BSLD = y_NBSCD.transpose(1, 2, 0, 3, 4).reshape(B, shards, n * chunk, -1)[:, :, :local]
  return y_BSLD.reshape(B, T, -1)


def _run_layer(layer, x_BTD, rope, anchor, segment_ids_BT, q_index_BT):
  return layer(
    x_BTD,
    rope,
    anchor=anchor,
    segment_ids_BT=segment_ids_BT,
    q_index_BT=q_index_BT,
    cache=None,
    cache_index=0,
  )[0]


def _remat_layer(policy: str):
  """The per-layer function of the unrolled loop under `model.remat` (`lcjax.models.remat`)."""
  if policy == "none":
    return _run_layer
  return nnx.remat(_run_layer, policy=checkpoint_policy(policy), static_argnums=(3,))


class DecoderLM(nnx.Module):
  """Decoder-only LM: embed → blocks → RMSNorm → logits, for `model.family="llama"`.

  Its blocks are attention layers of the Llama family (Llama, Mistral, Qwen2: full,
  sliding-window, LongGen's sink + window and strided layers) or Mamba-2 mixers, per
  `model.layer_types`, so one class holds plain transformers and hybrid stacks. (It was
  called `LlamaLM`; that name still works, with a DeprecationWarning.)

  `model(tokens_BT, positions=None, segment_ids=None) -> logits_BTV` (float32).
  `positions` are RoPE positions (default arange(T)); `segment_ids` mark packed
  documents (default: one document, no document mask).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    validate_model_config(cfg)
    self.dtype = resolve_dtype(cfg.dtype)
    self.anchor = cfg.anchor
    self.remat = cfg.remat
    self.head_dim = head_dim(cfg)
    self.num_kv_heads = cfg.num_kv_heads
    # Hashable, so the graph definition can be a static jit argument (generate).
    self.rope_items = tuple(
      (k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(cfg.rope.to_dict().items())
    )
    self.embed_tokens = token_embedding(cfg, dtype=self.dtype, rngs=rngs)
    self.layer_kinds = layer_types(cfg)
    # Which layers multiply q by the RoPE type's query scale (eabf: all but the first
    # `rope.eabf_unscaled_layers`); None when the type has none. Static, like the rope dict.
    self.q_scale_layers = query_scale_layers(self.rope_parameters, len(self.layer_kinds))
    blocks = [DecoderBlock(cfg, kind, dtype=self.dtype, rngs=rngs) for kind in self.layer_kinds]
    self.scan_layers = scan_layers_enabled(cfg)
    if self.scan_layers:
      # One block whose parameters carry a leading layer axis ('layers/mlp/...' [L, ...]),
      # stacked from blocks built in order so scanned and unrolled models initialize alike.
      graphdef, _ = nnx.split(blocks[0])
      states = [nnx.split(block)[1] for block in blocks]
      self.layers = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    else:
      self.layers = nnx.List(blocks)
    self.norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
    self.lm_head = output_head(cfg, dtype=self.dtype, rngs=rngs)

  @property
  def rope_parameters(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_items}

  def rope_tables(self, positions_BT: jax.Array) -> RopeTables:
    """cos/sin (exact angles, `rope_cos_sin`) and the optional query scale for these positions.

    The query scale is left out when no layer applies it; each layer takes its own view
    through `layer_rope` with its flag in `q_scale_layers`.
    """
    cos_BTK, sin_BTK = cos_sin_for_positions(self.rope_parameters, self.head_dim, positions_BT)
    scaled = self.q_scale_layers is not None and any(self.q_scale_layers)
    q_scale_BT = query_scale(self.rope_parameters, positions_BT) if scaled else None
    return RopeTables(cos_BTK, sin_BTK, q_scale_BT)

  def _layer_scaled(self, i: int) -> bool | None:
    """Layer `i`'s flag in `q_scale_layers` (None: no query scale anywhere)."""
    return None if self.q_scale_layers is None else self.q_scale_layers[i]

  def hidden_states(
    self,
    tokens_BT: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    token_index: jax.Array | None = None,
    caches: list[KVCache] | None = None,
    cache_index: jax.Array | int = 0,
    rope: RopeTables | None = None,
  ) -> tuple[jax.Array, list[KVCache] | None]:
    """Final normed hidden states [B,T,D] (and updated caches when decoding).

    `rope` replaces the RoPE tables `rope_tables(positions)` would give (studies that change
    how angles are formed, `lcjax.eval.precision`); it must match the positions.

    `token_index` [B,T] is each token's index in the packed row, which masks are
    evaluated on (default arange(T)). Context-parallel layouts (zigzag, striped)
    permute the tokens once at the input boundary and pass the permutation here, so
    causal and document masks still see global order.
    """
    B, T = tokens_BT.shape
    if token_index is not None and "mamba2" in self.layer_kinds:
      raise NotImplementedError(
        "hybrid stacks with mamba2 layers need tokens in order; context-parallel layouts "
        "(token_index) are not supported for them yet: set mesh.context=1"
      )
    if token_index is not None:
      if caches is not None:
        raise ValueError(
          "token_index reorders a packed row; decoding with a cache does not take it"
        )
      q_index_BT = jnp.broadcast_to(jnp.asarray(token_index, jnp.int32), (B, T))
    else:
      q_index_BT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))
    positions_BT = q_index_BT if positions is None else positions
    if rope is None:
      rope = self.rope_tables(positions_BT)
    x_BTD = constrain(self.embed_tokens(tokens_BT), ACTIVATION_BTD)
    if caches is None:
      # Rows in order pass None as the token index, which lets attention use a static
      # block schedule; permuted layouts pass the permutation.
      layer_index_BT = None if token_index is None else q_index_BT
      if self.scan_layers:
        return self.norm(self._scan(x_BTD, rope, segment_ids, layer_index_BT)), None
      run_layer = _remat_layer(self.remat)
      for i, layer in enumerate(self.layers):
        rope_i = layer_rope(rope, self._layer_scaled(i))
        x_BTD = run_layer(layer, x_BTD, rope_i, self.anchor, segment_ids, layer_index_BT)
      return self.norm(x_BTD), None
    new_caches = []
    for i, cache in enumerate(caches):
      layer = self.layer(i)
      x_BTD, cache = layer(
        x_BTD,
        layer_rope(rope, self._layer_scaled(i)),
        anchor=self.anchor,
        segment_ids_BT=None if segment_ids is None else segment_ids,
        q_index_BT=q_index_BT,
        cache=cache,
        cache_index=cache_index,
      )
      new_caches.append(cache)
    return self.norm(x_BTD), new_caches

  def _scan(self, x_BTD, rope, segment_ids_BT, index_BT):
    """The layers as one `jax.lax.scan` over their stacked parameters (`model.scan_layers`).

    The remat policy wraps the scan body, so recomputation and offload happen one layer
    at a time. The segment ids and mask indices enter as per-layer scan inputs rather
    than closed-over values: closed over, XLA hoists ring attention's mask work out of
    the loop and materializes every layer's block masks at once (28 GiB at 1M tokens in
    issue #15's prototype).

    A query scale that only some layers apply (entropy-aware ABF leaves the first
    `rope.eabf_unscaled_layers` unscaled) differs per layer, so it cannot be Python control
    flow in the one body: the per-layer flags enter as a scan input `scaled_L` and
    `layer_rope` selects the scale or 1 from them.
    """
    graphdef, stacked = nnx.split(self.layers)
    L = len(self.layer_kinds)
    per_layer = lambda a_BT: None if a_BT is None else jnp.broadcast_to(a_BT, (L, *a_BT.shape))  # noqa: E731
    anchor = self.anchor
    flags = self.q_scale_layers
    # All-or-none flags need no per-layer input: rope_tables already kept or dropped the scale.
    scaled_L = None if flags is None or len(set(flags)) == 1 else jnp.asarray(flags)

    def body(x_BTD, xs):
      layer_state, seg_BT, index_BT, scaled = xs
      layer = nnx.merge(graphdef, layer_state)
      return _run_layer(layer, x_BTD, layer_rope(rope, scaled), anchor, seg_BT, index_BT), None

    xs = (stacked, per_layer(segment_ids_BT), per_layer(index_BT), scaled_L)
    x_BTD, _ = jax.lax.scan(remat(body, self.remat), x_BTD, xs)
    return x_BTD

  def layer(self, i: int) -> DecoderBlock:
    """Decoder layer `i`; with `scan_layers`, a copy sliced from the stack (for reading)."""
    if not self.scan_layers:
      return self.layers[i]
    graphdef, stacked = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Vocabulary logits in float32 from hidden states (tied or separate head)."""
    return vocab_logits(self.embed_tokens, self.lm_head, h_BTD)

  def __call__(self, tokens_BT, *, positions=None, segment_ids=None, token_index=None) -> jax.Array:
    h_BTD, _ = self.hidden_states(
      tokens_BT, positions=positions, segment_ids=segment_ids, token_index=token_index
    )
    return self.logits(h_BTD)

  def init_cache(self, batch: int, max_len: int) -> list:
    """KV caches for attention layers, conv + SSM states for mamba2 layers."""
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return [
      self.layer(i).mixer.init_cache(batch)
      if kind == "mamba2"
      else KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
      for i, kind in enumerate(self.layer_kinds)
    ]

  def decode(self, tokens_BT, caches: list[KVCache], cache_index) -> tuple[jax.Array, list]:
    """Runs `tokens_BT` at positions cache_index.. against the cache; returns logits, caches."""
    h_BTD, caches = self.hidden_states(tokens_BT, caches=caches, cache_index=cache_index)
    return self.logits(h_BTD), caches


def __getattr__(name: str):
  if name == "LlamaLM":  # the class's name before it also held Mamba-2 and hybrid stacks
    warnings.warn(
      "lcjax.models.LlamaLM is now DecoderLM (it also builds Mamba-2 and hybrid stacks); "
      "the old name is removed in lcjax 0.3",
      DeprecationWarning,
      stacklevel=2,
    )
    return DecoderLM
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
