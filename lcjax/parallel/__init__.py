"""Parallelism: the device mesh, logical-axis sharding rules, sequence layouts and
context-parallel attention (ring and all-gather).

mesh = make_mesh(config.mesh)
batch = apply_layout(batch, mesh.shape["context"], config.parallel.layout)
out_BTHD = ring_attention(q_BTHD, k_BSKD, v_BSKD, mask=mask, q_index=batch["token_index"],
                          q_segment_ids=batch["segment_ids"], mesh=mesh,
                          strategy=config.parallel.context_strategy)
"""

from lcjax.parallel.layouts import (
  LAYOUTS,
  apply_layout,
  check_layout,
  from_layout,
  inverse_permutation,
  permutation,
  ring_work,
  to_layout,
  work_imbalance,
)
from lcjax.parallel.mesh import (
  BATCH_AXES,
  CONTEXT_STRATEGIES,
  LOGICAL_RULES,
  MESH_AXES,
  logical_sharding,
  logical_to_spec,
  make_mesh,
  mesh_shape,
  validate_parallel_config,
)
from lcjax.parallel.ring import STRATEGIES, ring_attention, ring_attention_stats

__all__ = [
  "MESH_AXES",
  "BATCH_AXES",
  "CONTEXT_STRATEGIES",
  "LOGICAL_RULES",
  "make_mesh",
  "mesh_shape",
  "logical_to_spec",
  "logical_sharding",
  "validate_parallel_config",
  "LAYOUTS",
  "check_layout",
  "permutation",
  "inverse_permutation",
  "to_layout",
  "from_layout",
  "apply_layout",
  "ring_work",
  "work_imbalance",
  "STRATEGIES",
  "ring_attention",
  "ring_attention_stats",
]
