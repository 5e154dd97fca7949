"""The computation the 2-process test runs, also run in one process to compare."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lcjax.attention import MaskSpec
from lcjax.models import build_model, llama_config
from lcjax.parallel.layouts import apply_layout
from lcjax.parallel.mesh import make_mesh
from lcjax.parallel.ring import ring_attention
from lcjax.parallel.sharding import batch_sharding, tree_shardings
from lcjax.train.step import init_state, make_train_step

B, T = 4, 64


def _global_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 384, size=(B, T + 1))
  seg = np.repeat(np.array([[1] * 20 + [2] * 30 + [3] * 14]), B, axis=0)
  pos = np.concatenate([np.arange(20), np.arange(30), np.arange(14)])[None].repeat(B, 0)
  return dict(
    tokens=tokens[:, :-1].astype(np.int32),
    targets=tokens[:, 1:].astype(np.int32),
    segment_ids=seg.astype(np.int32),
    positions=pos.astype(np.int32),
    loss_weights=np.ones((B, T), np.float32),
  )


def _to_global(x, sharding, process_local):
  if not process_local:
    return jax.device_put(x, sharding)
  # Each process holds its rows (the data axis spans the processes).
  rows = x.shape[0] // jax.process_count()
  local = x[jax.process_index() * rows : (jax.process_index() + 1) * rows]
  return jax.make_array_from_process_local_data(sharding, local, x.shape)


def _gather(x):
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_case(mesh_axes, process_local=False):
  mesh = make_mesh(ml_collections.ConfigDict(mesh_axes))
  sharding = batch_sharding(mesh)
  batch = apply_layout(_global_batch(), mesh.shape["context"], "zigzag")
  arrays = {k: _to_global(v, sharding, process_local) for k, v in batch.items()}

  # Ring attention on its own.
  rng = np.random.default_rng(1)
  q = rng.standard_normal((B, T, 4, 16)).astype(np.float32)
  qkv_sharding = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(("data", "fsdp"), "context")
  )
  qg = _to_global(q, qkv_sharding, process_local)
  mask = MaskSpec(causal=True, document=True)

  def attn_loss(q, seg, index):  # global arrays are arguments, never closed over
    out = ring_attention(
      q,
      q[:, :, :2],
      q[:, :, 2:],
      mask=mask,
      mesh=mesh,
      q_segment_ids=seg,
      kv_segment_ids=seg,
      q_index=index,
      kv_index=index,
      batch_axes=("data", "fsdp"),
      block_q=8,
      block_kv=8,
    )
    return jnp.sum(out * out), out

  (value, out), grad = jax.jit(jax.value_and_grad(attn_loss, has_aux=True))(
    qg, arrays["segment_ids"], arrays["token_index"]
  )

  # One training step of a tiny Llama on the same mesh.
  cfg = llama_config(
    d_model=32,
    mlp_dim=64,
    num_heads=4,
    num_kv_heads=2,
    dtype="float32",
    max_position_embeddings=T,
    attention_block_q=8,
    attention_block_kv=8,
    rope=dict(rope_type="default", rope_theta=1e4, max_position_embeddings=T),
  )
  model = build_model(cfg, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-3)
  step = make_train_step(graphdef, tx, optax.constant_schedule(1e-3), grad_accum=1, loss_chunk=T)
  state = init_state(model, tx, 0)
  state = jax.device_put(state, tree_shardings(state, mesh))
  with jax.set_mesh(mesh):
    state, metrics = step(state, arrays)
    _, metrics2 = step(state, arrays)
  return dict(
    attn_value=float(value),
    attn_out=_gather(out).tolist(),
    attn_grad=_gather(grad).tolist(),
    loss=[float(metrics["loss"]), float(metrics2["loss"])],
  )
