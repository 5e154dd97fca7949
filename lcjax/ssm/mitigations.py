"""Training-free state-collapse mitigations for Mamba-2 (Chen et al. 2024, "Stuffed Mamba").

Chen et al. 2024, "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
Long-Context Modeling" (arXiv:2410.07145 v1), §5: beyond the training length a few
state channels of a Mamba-2 layer explode (state collapse) because the model never
learned to forget. The training-free fixes, on the SSD recurrence of Dao & Gu 2024
("Transformers are SSMs", §2 and §5) h_t = α_t·h_{t−1} + (Δ_t·x_t) B_tᵀ, α_t = exp(Δ_t·A):

- M1 "forget more, remember less" (§5.1): Δ couples the decay and the input, so the
  two are scaled separately: log α_t ← decay_scale · Δ_t·A (decay_scale ≥ 1 forgets
  more) and the inserted term ← input_scale · (Δ_t·x_t) B_tᵀ (input_scale ≤ 1
  remembers less). `forget_more_remember_less`.
- M2 state normalization (§5.2): after each recurrent update the state is rescaled so
  its norm stays below a threshold (`normalize_state`, `ssd_step(state_norm_max=)`).
  Recurrent mode only: it is not linear, so the chunked form cannot apply it.
- M3 sliding window through the state difference (§5.3): by linearity
  h_t − (∏_{s=t−r+1..t} α_s)·h_{t−r} is exactly the state built from the last r inputs
  alone (from a zero state). `window_state_difference`, `ssd_windowed`.
- M4, continual training on longer sequences, is a config (a longer `data.seq_len`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.ssm.ssd import check_shapes, compute_dtype, log_decay, normalize_state, ssd_step

__all__ = [
  "forget_more_remember_less",
  "normalize_state",
  "ssd_states",
  "window_log_decay",
  "window_state_difference",
  "ssd_windowed",
]


def forget_more_remember_less(
  A_H: jax.Array, x_BTHP: jax.Array, *, decay_scale: float = 1.0, input_scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """M1 of Chen et al. 2024 §5.1: returns (A_H, x_BTHP) to feed the SSD scan instead.

  Scaling A by decay_scale scales every log-decay Δ_t·A (the decay alone, Δ is
  untouched); scaling x by input_scale scales the inserted term (Δ_t·x_t) B_tᵀ alone.
  The D·x skip must keep the unscaled x. Factors of exactly 1 return the inputs.
  """
  if decay_scale < 1.0 or not 0.0 < input_scale <= 1.0:
    raise ValueError(
      f"forget more, remember less needs decay_scale >= 1 and 0 < input_scale <= 1; got "
      f"{decay_scale} and {input_scale}"
    )
  if decay_scale != 1.0:
    A_H = A_H * decay_scale
  if input_scale != 1.0:
    x_BTHP = x_BTHP * input_scale
  return A_H, x_BTHP


def ssd_states(
  x_BTHP: jax.Array,
  dt_BTH: jax.Array,
  A_H: jax.Array,
  B_BTGN: jax.Array,
  C_BTGN: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  reset_BT: jax.Array | None = None,
  state_norm_max: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The recurrence step by step, keeping every state (Dao & Gu 2024, §2).

  Memory is T·H·P·N per row: meant for analysis (state statistics, M3) at small sizes.
  Returns (y_BTHP, h_BTHPN) with h_BTHPN[:, t] the state after step t, float32 (float64
  for float64 inputs). `state_norm_max` applies M2 (Chen et al. 2024, §5.2).
  """
  check_shapes(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN)
  Bsz, T, H, P = x_BTHP.shape
  N = B_BTGN.shape[-1]
  f = compute_dtype(x_BTHP)
  h_BHPN = jnp.zeros((Bsz, H, P, N), f) if initial_state is None else initial_state.astype(f)
  reset_BT = jnp.zeros((Bsz, T), bool) if reset_BT is None else reset_BT

  def step(h_BHPN, inputs):
    x_BHP, dt_BH, B_BGN, C_BGN, reset_B = inputs
    h_BHPN = jnp.where(reset_B[:, None, None, None], 0.0, h_BHPN)
    y_BHP, h_BHPN = ssd_step(h_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_norm_max=state_norm_max)
    return h_BHPN, (y_BHP, h_BHPN)

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  _, (y_TBHP, h_TBHPN) = jax.lax.scan(
    step, h_BHPN, tuple(map(time_major, (x_BTHP, dt_BTH, B_BTGN, C_BTGN, reset_BT)))
  )
  return time_major(y_TBHP), time_major(h_TBHPN)


def window_log_decay(a_BTH: jax.Array, window: int) -> jax.Array:
  """log ∏_{s=t−r+1..t} α_s = Σ_{s=max(0,t−r+1)..t} a_s for each t (r = window).

  A windowed sum (`lax.reduce_window`), not a difference of cumulative sums, so a −inf
  (a reset) inside the window gives −inf (a zero decay) and never inf − inf.
  """
  return jax.lax.reduce_window(
    a_BTH, jnp.array(0, a_BTH.dtype), jax.lax.add, (1, window, 1), (1, 1, 1),
    ((0, 0), (window - 1, 0), (0, 0)),
  )  # fmt: skip


def window_state_difference(
  h_BTHPN: jax.Array, a_BTH: jax.Array, window: int, initial_state: jax.Array | None = None
) -> jax.Array:
  """M3 of Chen et al. 2024 §5.3: h_t − (∏_{s=t−r+1..t} α_s)·h_{t−r} for every t.

  Args:
    h_BTHPN: the states after each step (`ssd_states`).
    a_BTH: log-decays log α_t = Δ_t·A (−inf at resets).
    window: r ≥ 1, the number of most recent inputs kept.
    initial_state: h_BHPN before step 0 (zeros if None); for t < r it plays h_{t−r}
      with the decay product over steps 0..t.

  Returns:
    The windowed states [B,T,H,P,N]; exactly (by linearity of the recurrence) the state
    from running only inputs t−r+1..t from a zero state.
  """
  if window < 1:
    raise ValueError(f"window={window} must be a positive integer")
  Bsz, T, H, P, N = h_BTHPN.shape
  h0_BHPN = jnp.zeros((Bsz, H, P, N), h_BTHPN.dtype) if initial_state is None else initial_state
  # h_{t−r} for every t: the initial state where t − r < 0.
  lagged_BTHPN = jnp.concatenate(
    [jnp.broadcast_to(h0_BHPN[:, None], (Bsz, min(window, T), H, P, N)), h_BTHPN], axis=1
  )[:, :T]
  decay_BTH = jnp.exp(window_log_decay(a_BTH.astype(h_BTHPN.dtype), window))
  return h_BTHPN - decay_BTH[..., None, None] * lagged_BTHPN.astype(h_BTHPN.dtype)


def ssd_windowed(
  x_BTHP: jax.Array,
  dt_BTH: jax.Array,
  A_H: jax.Array,
  B_BTGN: jax.Array,
  C_BTGN: jax.Array,
  *,
  window: int,
  initial_state: jax.Array | None = None,
  reset_BT: jax.Array | None = None,
  return_states: bool = False,
):
  """SSD outputs read from the sliding-window states (M3, Chen et al. 2024 §5.3).

  y_t = h_t^{(r)} C_t with h_t^{(r)} = h_t − (∏_{s=t−r+1..t} α_s)·h_{t−r}: each output
  sees only the last `window` inputs. Keeps every state (memory T·H·P·N per row).
  Returns y_BTHP, and the windowed h_BTHPN too if return_states.
  """
  _, h_BTHPN = ssd_states(
    x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, initial_state=initial_state, reset_BT=reset_BT
  )
  f = h_BTHPN.dtype
  a_BTH = log_decay(dt_BTH, A_H, reset_BT, f)
  hw_BTHPN = window_state_difference(h_BTHPN, a_BTH, window, initial_state)
  H, G = x_BTHP.shape[2], B_BTGN.shape[2]
  C_BTHN = jnp.repeat(C_BTGN.astype(f), H // G, axis=2)
  y_BTHP = jnp.einsum("bthpn,bthn->bthp", hw_BTHPN, C_BTHN)
  return (y_BTHP, hw_BTHPN) if return_states else y_BTHP
