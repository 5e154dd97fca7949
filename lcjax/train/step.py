"""The jitted training step: loss, gradient accumulation, optimizer update.

State is a plain dict pytree {params, opt_state, step, rng} so orbax saves it as
is; params are the model's `nnx.Param` values as a pure dict, merged back into
the model graph inside the step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lcjax.train.loss import chunked_cross_entropy

__all__ = ["init_state", "make_train_step", "make_eval_step"]


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  # Copies: the train step donates its state, which must not delete the model's arrays.
  params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return dict(
    params=params,
    opt_state=tx.init(params),
    step=jnp.int32(0),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def _loss_sums(graphdef, params, batch, loss_chunk: int, document_mask: bool):
  model = nnx.merge(graphdef, params)
  h_BTD, _ = model.hidden_states(
    batch["tokens"],
    positions=batch["positions"],
    segment_ids=batch["segment_ids"] if document_mask else None,
    token_index=batch.get("token_index"),  # set by context-parallel layouts
  )
  return chunked_cross_entropy(
    model.logits, h_BTD, batch["targets"], batch["loss_weights"], chunk=loss_chunk
  )


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  *,
  grad_accum: int,
  loss_chunk: int,
  document_mask: bool = True,
):
  """Returns step(state, batch) -> (state, metrics).

  With `grad_accum = A`, the batch's rows are split into A micro-batches whose
  weighted NLL sums and weight sums are accumulated before one update, so the
  update equals that of one big batch (the loss is a mean over loss weights).
  """

  def grads_of(params, batch):
    def f(p):
      nll, weight = _loss_sums(graphdef, p, batch, loss_chunk, document_mask)
      return nll, weight

    (nll, weight), grads = jax.value_and_grad(f, has_aux=True)(params)
    return nll, weight, grads

  def step(state, batch):
    params = state["params"]
    if grad_accum == 1:
      nll, weight, grads = grads_of(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, mb):
        nll_c, w_c, g_c = carry
        nll, w, g = grads_of(params, mb)
        return (nll_c + nll, w_c + w, jax.tree.map(jnp.add, g_c, g)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      zero = jnp.float32(0.0)
      (nll, weight, grads), _ = jax.lax.scan(body, (zero, zero, zeros), micro)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(
      params=optax.apply_updates(params, updates),
      opt_state=opt_state,
      step=state["step"] + 1,
      rng=state["rng"],
    )
    metrics = dict(
      loss=nll / denom,
      grad_norm=optax.tree.norm(grads),
      lr=schedule(state["step"]),
      loss_tokens=weight,
    )
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0,))


def make_eval_step(graphdef, *, loss_chunk: int, document_mask: bool = True):
  """Returns eval(params, batch) -> (nll_sum, weight_sum) for validation loss."""

  def f(params, batch):
    return _loss_sums(graphdef, params, batch, loss_chunk, document_mask)

  return jax.jit(f)
