"""Mamba-2 state space duality (SSD): chunked scan, sequential reference, recurrent step.

Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality" (ICML 2024, arXiv:2405.21060). Per head, with
a scalar A < 0, a step size Δ_t > 0, head dim P and state size N, the selective SSM
recurrence of §2 specialised to A_t = exp(Δ_t·A)·I (the SSD layer of §5 and §7) is

  h_t = exp(Δ_t·A)·h_{t−1} + (Δ_t·x_t) B_tᵀ        h_t: [P, N]
  y_t = h_t C_t                                       y_t: [P]

`ssd_sequential` runs it step by step (the reference); `ssd_step` is one update
(generation); `ssd_chunked` is the block decomposition of §6 (Listing 1,
`ssd_minimal_discrete` in state-spaces/mamba): with Δ folded into X and A (not into
B), each chunk of `chunk` steps computes its diagonal block like masked attention,
its final state, and the off-diagonal contribution of the state entering it; a scan
over chunks carries the states between them. The skip term D·x_t is the caller's.

Groups: B and C have G groups shared by H/G consecutive heads (head h reads group
h // (H/G)), as `n_groups` in transformers' Mamba2. State is accumulated in float32
(float64 when the inputs are float64). `reset_BT` marks steps whose incoming state is
discarded (h_{t−1} := 0), which the LM uses for document boundaries; in log space it
is a decay of −inf, so the chunked scan never subtracts cumulative sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "check_shapes",
  "compute_dtype",
  "log_decay",
  "normalize_state",
  "segsum",
  "ssd_chunked",
  "ssd_sequential",
  "ssd_step",
]


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """float32, or float64 when the inputs are float64 (state accumulation dtype)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def check_shapes(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN) -> tuple[int, int]:
  """Validates SSD input shapes; returns (G groups, R = H // G heads per group)."""
  if x_BTHP.ndim != 4:
    raise ValueError(f"ssd expects x [B,T,H,P]; got shape {x_BTHP.shape}")
  Bsz, T, H, _ = x_BTHP.shape
  if dt_BTH.shape != (Bsz, T, H) or A_H.shape != (H,):
    raise ValueError(
      f"ssd expects dt [B,T,H] = {(Bsz, T, H)} and A [H] = {(H,)}; got dt {dt_BTH.shape}, "
      f"A {A_H.shape}"
    )
  if B_BTGN.ndim != 4 or B_BTGN.shape != C_BTGN.shape or B_BTGN.shape[:2] != (Bsz, T):
    raise ValueError(
      f"ssd expects B and C [B,T,G,N] of one shape with B,T = {(Bsz, T)}; got B "
      f"{B_BTGN.shape}, C {C_BTGN.shape}"
    )
  G = B_BTGN.shape[2]
  if H % G:
    raise ValueError(f"ssd needs the number of heads H={H} to be a multiple of groups G={G}")
  return G, H // G


def normalize_state(h_BHPN: jax.Array, max_norm: float) -> jax.Array:
  """h ← h · min(1, max_norm / ‖h‖_F) per head: state normalization, mitigation M2.

  Chen et al. 2024, "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
  Long-Context Modeling", §5.2: normalizing the state after each update keeps its norm
  below a threshold, so no channel can explode past the training length. The norm is
  over each head's [P, N] state (the leading axes are batch and head).
  """
  norm_BH11 = jnp.sqrt(jnp.sum(jnp.square(h_BHPN), axis=(-2, -1), keepdims=True))
  return h_BHPN * jnp.minimum(1.0, max_norm / jnp.maximum(norm_BH11, 1e-30))


def segsum(a_XL: jax.Array) -> jax.Array:
  """Stable segment sum: S[..., i, j] = Σ_{k=j+1..i} a_k for i ≥ j, −inf for i < j.

  Computed as a cumulative sum over a masked, repeated matrix (the stable `segsum`
  of state-spaces/mamba `ssd_minimal.py` and transformers' `segment_sum`), never
  as a difference of cumulative sums: no cancellation, and a −inf entry (a reset)
  gives −inf for every segment that spans it instead of inf − inf = NaN.
  exp(S) is the 1-semiseparable mask L of Dao & Gu 2024 (§3, §6).
  """
  L = a_XL.shape[-1]
  a_XLL = jnp.broadcast_to(a_XL[..., :, None], (*a_XL.shape, L))  # [..., i, j] = a_i
  strictly_lower_LL = jnp.tril(jnp.ones((L, L), bool), -1)
  sums_XLL = jnp.cumsum(jnp.where(strictly_lower_LL, a_XLL, 0), axis=-2)
  return jnp.where(jnp.tril(jnp.ones((L, L), bool)), sums_XLL, -jnp.inf)


def log_decay(dt_BTH, A_H, reset_BT, dtype) -> jax.Array:
  """log α_t = Δ_t·A, and −inf where the incoming state is reset."""
  a_BTH = dt_BTH.astype(dtype) * A_H.astype(dtype)
  if reset_BT is not None:
    a_BTH = jnp.where(reset_BT[..., None], -jnp.inf, a_BTH)
  return a_BTH


def ssd_chunked(
  x_BTHP: jax.Array,
  dt_BTH: jax.Array,
  A_H: jax.Array,
  B_BTGN: jax.Array,
  C_BTGN: jax.Array,
  *,
  chunk: int,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  reset_BT: jax.Array | None = None,
):
  """SSD by chunks (Dao & Gu 2024, §6 and Listing 1): O(T·chunk) work, O(T/chunk) scan.

  Args:
    x_BTHP: inputs per head.
    dt_BTH: step sizes Δ (after softplus and clamping), ≥ 0.
    A_H: continuous-time decay per head (negative).
    B_BTGN, C_BTGN: input and output projections per group.
    chunk: chunk length; any T works (padded internally with Δ = 0 steps, which
      neither decay nor write the state, so the final state is unchanged).
    initial_state: h_BHPN entering step 0 (zeros if None).
    return_final_state: also return the state after the last step.
    reset_BT: optional bool; True discards the state entering that step.

  Returns:
    y_BTHP (float32, or float64 for float64 inputs), and h_BHPN if return_final_state.
  """
  G, R = check_shapes(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN)
  if chunk < 1:
    raise ValueError(f"ssd_chunked chunk={chunk} must be a positive integer")
  Bsz, T, H, P = x_BTHP.shape
  N = B_BTGN.shape[-1]
  f = compute_dtype(x_BTHP)
  # Δ folded into X and A, not into B (Listing 1's calling convention).
  xdt_BTHP = x_BTHP.astype(f) * dt_BTH.astype(f)[..., None]
  a_BTH = log_decay(dt_BTH, A_H, reset_BT, f)
  Bm_BTGN, Cm_BTGN = B_BTGN.astype(f), C_BTGN.astype(f)

  nc = -(-T // chunk)
  pad = nc * chunk - T
  if pad:  # zero Δ: x·Δ = 0 writes nothing and log-decay 0 keeps the state
    widths = lambda a: ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)
    xdt_BTHP, a_BTH, Bm_BTGN, Cm_BTGN = (
      jnp.pad(a, widths(a)) for a in (xdt_BTHP, a_BTH, Bm_BTGN, Cm_BTGN)
    )
  # Heads split as (G, R): head h = g·R + r reads group g.
  x_BCLGRP = xdt_BTHP.reshape(Bsz, nc, chunk, G, R, P)
  a_BGRCL = a_BTH.reshape(Bsz, nc, chunk, G, R).transpose(0, 3, 4, 1, 2)
  B_BCLGN = Bm_BTGN.reshape(Bsz, nc, chunk, G, N)
  C_BCLGN = Cm_BTGN.reshape(Bsz, nc, chunk, G, N)

  a_cum_BGRCL = jnp.cumsum(a_BGRCL, axis=-1)  # log decay from the chunk start to l
  S_BGRCLS = segsum(a_BGRCL)  # log decay from s (exclusive) to l (inclusive)

  # 1. Diagonal blocks: masked "attention" (C_l·B_s) exp(S_ls) (Δ_s x_s) within a chunk.
  CB_BCGLS = jnp.einsum("bclgn,bcsgn->bcgls", C_BCLGN, B_BCLGN)
  y_diag_BCLGRP = jnp.einsum("bcgls,bgrcls,bcsgrp->bclgrp", CB_BCGLS, jnp.exp(S_BGRCLS), x_BCLGRP)

  # 2. State at each chunk's end from its own inputs: Σ_s exp(S[last, s]) (Δ_s x_s) B_sᵀ.
  decay_to_end_BGRCS = jnp.exp(S_BGRCLS[..., -1, :])
  states_BCGRPN = jnp.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", B_BCLGN, decay_to_end_BGRCS, x_BCLGRP)

  # 3. Inter-chunk recurrence: h_c = exp(Σ_chunk a)·h_{c−1} + states_c (a scan over chunks).
  chunk_decay_CBGR = jnp.exp(a_cum_BGRCL[..., -1]).transpose(3, 0, 1, 2)
  if initial_state is None:
    h0_BGRPN = jnp.zeros((Bsz, G, R, P, N), f)
  else:
    if initial_state.shape != (Bsz, H, P, N):
      raise ValueError(
        f"ssd initial_state must be h [B,H,P,N] = {(Bsz, H, P, N)}; got {initial_state.shape}"
      )
    h0_BGRPN = initial_state.astype(f).reshape(Bsz, G, R, P, N)

  def carry_state(h_BGRPN, inputs):
    decay_BGR, states_BGRPN = inputs
    return decay_BGR[..., None, None] * h_BGRPN + states_BGRPN, h_BGRPN

  final_BGRPN, h_in_CBGRPN = jax.lax.scan(
    carry_state, h0_BGRPN, (chunk_decay_CBGR, states_BCGRPN.swapaxes(0, 1))
  )

  # 4. Off-diagonal blocks: the state entering the chunk, decayed to l and read by C_l.
  y_off_BCLGRP = jnp.einsum(
    "bclgn,cbgrpn,bgrcl->bclgrp", C_BCLGN, h_in_CBGRPN, jnp.exp(a_cum_BGRCL)
  )
  y_BTHP = (y_diag_BCLGRP + y_off_BCLGRP).reshape(Bsz, nc * chunk, H, P)[:, :T]
  if return_final_state:
    return y_BTHP, final_BGRPN.reshape(Bsz, H, P, N)
  return y_BTHP


def ssd_step(
  h_BHPN: jax.Array,
  x_BHP: jax.Array,
  dt_BH: jax.Array,
  A_H: jax.Array,
  B_BGN: jax.Array,
  C_BGN: jax.Array,
  *,
  state_norm_max: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One recurrent update h ← exp(Δ·A)·h + (Δ·x) Bᵀ, y = h C (Dao & Gu 2024, §2, SSD §5).

  `state_norm_max` (mitigation M2 of Chen et al. 2024, "Stuffed Mamba: State Collapse
  and State Capacity of RNN-Based Long-Context Modeling", §5.2 state normalization):
  after the update each head's state is rescaled to Frobenius norm `state_norm_max`
  when it exceeds it (`normalize_state`); None leaves h as is.
  Returns (y_BHP, h_BHPN), both float32 (float64 for float64 inputs).
  """
  H = x_BHP.shape[1]
  G = B_BGN.shape[1]
  if H % G or B_BGN.shape != C_BGN.shape:
    raise ValueError(
      f"ssd_step needs B, C [B,G,N] of one shape with H={H} a multiple of G; got B "
      f"{B_BGN.shape}, C {C_BGN.shape}"
    )
  f = jnp.promote_types(compute_dtype(x_BHP), h_BHPN.dtype)
  dt_BH = dt_BH.astype(f)
  B_BHN = jnp.repeat(B_BGN.astype(f), H // G, axis=1)
  C_BHN = jnp.repeat(C_BGN.astype(f), H // G, axis=1)
  decay_BH = jnp.exp(dt_BH * A_H.astype(f))
  xdt_BHP = x_BHP.astype(f) * dt_BH[..., None]
  h_BHPN = decay_BH[..., None, None] * h_BHPN.astype(f) + xdt_BHP[..., None] * B_BHN[:, :, None]
  if state_norm_max is not None:
    h_BHPN = normalize_state(h_BHPN, state_norm_max)
  return jnp.einsum("bhpn,bhn->bhp", h_BHPN, C_BHN), h_BHPN


def ssd_sequential(
  x_BTHP: jax.Array,
  dt_BTH: jax.Array,
  A_H: jax.Array,
  B_BTGN: jax.Array,
  C_BTGN: jax.Array,
  *,
  chunk: int | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  reset_BT: jax.Array | None = None,
  state_norm_max: float | None = None,
):
  """The exact recurrence, one step at a time (`lax.scan` of `ssd_step`): the reference.

  Same signature and results as `ssd_chunked`; `chunk` is accepted and ignored so the
  two are interchangeable. `state_norm_max` is `ssd_step`'s state normalization (M2 of
  Chen et al. 2024, §5.2), which only the recurrent form can apply.
  """
  del chunk
  check_shapes(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN)
  Bsz, T, H, P = x_BTHP.shape
  N = B_BTGN.shape[-1]
  f = compute_dtype(x_BTHP)
  h_BHPN = jnp.zeros((Bsz, H, P, N), f) if initial_state is None else initial_state.astype(f)
  if h_BHPN.shape != (Bsz, H, P, N):
    raise ValueError(
      f"ssd initial_state must be h [B,H,P,N] = {(Bsz, H, P, N)}; got {h_BHPN.shape}"
    )
  reset_BT = jnp.zeros((Bsz, T), bool) if reset_BT is None else reset_BT

  def step(h_BHPN, inputs):
    x_BHP, dt_BH, B_BGN, C_BGN, reset_B = inputs
    h_BHPN = jnp.where(reset_B[:, None, None, None], 0.0, h_BHPN)
    y_BHP, h_BHPN = ssd_step(h_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_norm_max=state_norm_max)
    return h_BHPN, y_BHP

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  h_BHPN, y_TBHP = jax.lax.scan(
    step, h_BHPN, tuple(map(time_major, (x_BTHP, dt_BTH, B_BTGN, C_BTGN, reset_BT)))
  )
  y_BTHP = time_major(y_TBHP)
  if return_final_state:
    return y_BTHP, h_BHPN
  return y_BTHP
