"""A sharded train step keeps activations sharded: no collective moves an activation.

Issue #15 §0: a CPU speed-up in `lcjax/models/projections.py` merged [B, T, D] into
[B·T, D] for the weight gradients, which GSPMD could not keep sharded over ('fsdp',
'context'): the Llama-3-8B pod compile then all-reduced a bf16[1048576, 28672] gradient
on every chip and needed 124 GiB of temporaries. Here the tiny quickstart model is
compiled for 8 CPU devices with rows over fsdp=2 and the sequence over context=4, and
every all-gather / all-reduce / reduce-scatter / all-to-all in the optimized HLO must be
smaller than one device's share of a [B, T, D] activation. FSDP weight gathers and
gradient reductions are weight-sized; the ring moves K/V by collective-permute.
"""

import re

import jax
import numpy as np

from lcjax.config import load_config
from lcjax.train.aot import lower_train_step

B, T, D = 4, 1024, 64
FSDP, CONTEXT = 2, 4
_COLLECTIVE = re.compile(r"= (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all)(-start)?\(")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def collective_sizes(hlo_text: str) -> list[tuple[str, int, str]]:
  """(collective, elements, shape) of every array an HLO collective produces."""
  out = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    for dims in _SHAPE.findall(match.group(1)):
      elements = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      out.append((match.group(2), elements, dims))
  return out


def test_collective_parser_reads_plain_and_tuple_results():
  hlo = (
    "%a = f32[4,128,64]{2,1,0} all-gather(%x), channel_id=1\n"
    "%b = (f32[], f32[64,96]{1,0}) all-reduce(%y, %z), channel_id=2\n"
    "%c = f32[8]{0} add(%p, %q)\n"
  )
  assert collective_sizes(hlo) == [
    ("all-gather", 4 * 128 * 64, "4,128,64"),
    ("all-reduce", 1, ""),
    ("all-reduce", 64 * 96, "64,96"),
  ]


def test_sharded_train_step_moves_no_activation():
  config = load_config(
    f"configs/quickstart.py:tiny,seq_len={T}",
    {
      "model.num_layers": 1,
      "model.d_model": D,
      "model.mlp_dim": 96,
      "model.max_position_embeddings": T,
      "model.rope.max_position_embeddings": T,
      "attention.block_q": 128,
      "attention.block_kv": 128,
      "train.batch_size": B,
      "mesh.data": 1,
      "mesh.fsdp": FSDP,
      "mesh.context": CONTEXT,
    },
  )
  compiled, setup, _ = lower_train_step(config, jax.devices()[: FSDP * CONTEXT])
  activation = (B // FSDP) * (T // CONTEXT) * D  # one device's share of [B, T, D]
  largest_weight = max(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state["params"]))
  assert largest_weight < activation  # so the bound below separates the two
  moved = collective_sizes(compiled.as_text())
  assert moved, "the step has no collectives at all: is it sharded?"
  too_big = [c for c in moved if c[1] >= activation]
  assert not too_big, f"activation-sized collectives (>= {activation} elements): {too_big}"


def test_pallas_attention_under_an_fsdp_mesh_without_context_equals_blockwise():
  """Mosaic kernels cannot be partitioned by GSPMD: with context=1 on a multi-device mesh
  the model runs them in a one-step ring's shard_map (Pallas interpret mode on CPU)."""
  import jax.numpy as jnp
  from flax import nnx

  from lcjax.models import build_model, llama_config
  from lcjax.parallel.mesh import make_mesh

  tokens = np.random.default_rng(0).integers(0, 384, (8, 32))
  segments = np.concatenate([np.ones((8, 12), int), 2 * np.ones((8, 20), int)], 1)
  mesh = make_mesh(dict(data=1, fsdp=8, tensor=1, context=1))
  results = {}
  for impl in ("blockwise", "pallas"):
    kw = dict(num_layers=1, attention_impl=impl, attention_block_q=16, attention_block_kv=16)
    graphdef, params = nnx.split(build_model(llama_config(**kw), rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p, graphdef=graphdef):
      return jnp.mean(nnx.merge(graphdef, p)(tokens, segment_ids=segments) ** 2)

    with jax.set_mesh(mesh):
      results[impl] = jax.jit(jax.value_and_grad(loss))(params)
  # float32 online softmax in both; only the block order of the sums differs.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    results["blockwise"],
    results["pallas"],
  )
