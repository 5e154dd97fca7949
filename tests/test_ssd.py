"""SSD (Mamba-2): chunked scan == sequential recurrence == recurrent steps, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.ssm import segsum, ssd_chunked, ssd_sequential, ssd_step

# Batch, length (a multiple of neither 8 nor 64), heads, head dim, groups, state size.
SHAPE = dict(Bz=2, T=100, H=4, P=3, G=2, N=5)


def _inputs(seed, dtype, *, Bz, T, H, P, G, N):
  k = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(k[0], (Bz, T, H, P), dtype)
  dt = jax.nn.softplus(jax.random.normal(k[1], (Bz, T, H), dtype) - 1.0)
  A = -jnp.exp(jax.random.normal(k[2], (H,), dtype))
  B = jax.random.normal(k[3], (Bz, T, G, N), dtype)
  C = jax.random.normal(k[4], (Bz, T, G, N), dtype)
  h0 = jax.random.normal(k[5], (Bz, H, P, N), dtype)
  return x, dt, A, B, C, h0


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _check_chunked_vs_sequential(dtype, chunk, tol):
  """With and without an initial state, and with resets; outputs and final states."""
  x, dt, A, B, C, h0 = _inputs(0, dtype, **SHAPE)
  reset_BT = jax.random.bernoulli(jax.random.key(9), 0.05, (SHAPE["Bz"], SHAPE["T"]))
  cases = dict(
    plain={}, state=dict(initial_state=h0), reset=dict(initial_state=h0, reset_BT=reset_BT)
  )

  def run(ssd):
    return {
      name: ssd(x, dt, A, B, C, chunk=chunk, return_final_state=True, **kw)
      for name, kw in cases.items()
    }

  got, want = jax.jit(lambda: run(ssd_chunked))(), jax.jit(lambda: run(ssd_sequential))()
  for name in cases:
    (y, h), (y_ref, h_ref) = got[name], want[name]
    assert y.dtype == dtype and h.dtype == dtype
    assert _rel_err(y, y_ref) <= tol, name
    assert _rel_err(h, h_ref) <= tol, name


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_matches_sequential_fp64(chunk):
  with jax.enable_x64(True):
    _check_chunked_vs_sequential(jnp.float64, chunk, tol=1e-10)


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_matches_sequential_fp32(chunk):
  _check_chunked_vs_sequential(jnp.float32, chunk, tol=1e-4)


def test_reset_equals_running_each_segment_alone():
  """A reset at t makes the outputs from t on those of a fresh run on x[t:]."""
  with jax.enable_x64(True):
    x, dt, A, B, C, h0 = _inputs(1, jnp.float64, **SHAPE)
    reset_BT = jnp.zeros((SHAPE["Bz"], SHAPE["T"]), bool).at[:, 37].set(True)

    @jax.jit
    def run():
      y = ssd_chunked(x, dt, A, B, C, chunk=8, initial_state=h0, reset_BT=reset_BT)
      head = ssd_chunked(x[:, :37], dt[:, :37], A, B[:, :37], C[:, :37], chunk=8, initial_state=h0)
      tail = ssd_chunked(x[:, 37:], dt[:, 37:], A, B[:, 37:], C[:, 37:], chunk=8)
      return y, head, tail

    y, y_head, y_tail = run()
    assert _rel_err(y[:, :37], y_head) <= 1e-12
    assert _rel_err(y[:, 37:], y_tail) <= 1e-12


def test_recurrent_step_matches_chunked_on_every_prefix():
  """ssd_step t times == ssd_chunked on x[:, :t] (outputs and state), for every t ≤ T."""
  T = 13
  x, dt, A, B, C, h0 = _inputs(2, jnp.float32, **dict(SHAPE, T=T))

  @jax.jit
  def steps():
    def body(h, inputs):
      y, h = ssd_step(h, *inputs[:2], A, *inputs[2:])
      return h, (y, h)

    move = lambda a: jnp.moveaxis(a, 1, 0)
    _, (y_T, h_T) = jax.lax.scan(body, h0, (move(x), move(dt), move(B), move(C)))
    return move(y_T), move(h_T)

  @jax.jit
  def prefix(t):  # the first t steps; Δ = 0 afterwards pads without changing the state
    dt_t = jnp.where(jnp.arange(T)[None, :, None] < t, dt, 0.0)
    return ssd_chunked(x, dt_t, A, B, C, chunk=4, initial_state=h0, return_final_state=True)

  y_steps, h_steps = steps()
  for t in range(1, T + 1):
    y_prefix, h_prefix = prefix(t)
    assert _rel_err(y_steps[:, :t], y_prefix[:, :t]) <= 1e-5, t
    assert _rel_err(h_steps[:, t - 1], h_prefix) <= 1e-5, t
  # Real prefixes too (other shapes: the padding inside ssd_chunked).
  lengths = (1, 6, T)
  real = jax.jit(
    lambda: [
      ssd_chunked(
        x[:, :t],
        dt[:, :t],
        A,
        B[:, :t],
        C[:, :t],
        chunk=4,
        initial_state=h0,
        return_final_state=True,
      )
      for t in lengths
    ]
  )()
  for t, (y_prefix, h_prefix) in zip(lengths, real, strict=True):
    assert _rel_err(y_steps[:, :t], y_prefix) <= 1e-5, t
    assert _rel_err(h_steps[:, t - 1], h_prefix) <= 1e-5, t


def test_chunked_continues_from_its_final_state():
  """Prefill with the chunked scan, then continue from its state: the same as one pass."""
  with jax.enable_x64(True):
    x, dt, A, B, C, _ = _inputs(3, jnp.float64, **SHAPE)
    cut = 45

    @jax.jit
    def run():
      whole = ssd_chunked(x, dt, A, B, C, chunk=16, return_final_state=True)
      y1, h1 = ssd_chunked(
        x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], chunk=16, return_final_state=True
      )
      rest = ssd_chunked(
        x[:, cut:],
        dt[:, cut:],
        A,
        B[:, cut:],
        C[:, cut:],
        chunk=16,
        initial_state=h1,
        return_final_state=True,
      )
      return whole, y1, rest

    (y, h), y1, (y2, h2) = run()
    assert _rel_err(jnp.concatenate([y1, y2], axis=1), y) <= 1e-12
    assert _rel_err(h2, h) <= 1e-12


def test_gradients_chunked_match_sequential_fp32():
  """Gradients w.r.t. every input and the initial state, without and with resets."""
  T = 40
  x, dt, A, B, C, h0 = _inputs(4, jnp.float32, **dict(SHAPE, T=T))
  # resets are −inf log-decays: their gradients must stay finite
  reset_BT = jnp.zeros((SHAPE["Bz"], T), bool).at[:, 10].set(True).at[1, 25].set(True)
  w_y = jax.random.normal(jax.random.key(5), x.shape)
  w_h = jax.random.normal(jax.random.key(6), h0.shape)

  def loss(ssd, reset, *args):
    *inputs, h0 = args
    y, h = ssd(*inputs, chunk=8, initial_state=h0, return_final_state=True, reset_BT=reset)
    return jnp.sum(jnp.sin(y) * w_y) + jnp.sum(h * w_h)

  def grads(ssd):
    argnums = tuple(range(6))
    g = lambda reset: jax.grad(lambda *a: loss(ssd, reset, *a), argnums)(x, dt, A, B, C, h0)
    return g(None), g(reset_BT)

  got, want = jax.jit(lambda: grads(ssd_chunked))(), jax.jit(lambda: grads(ssd_sequential))()
  for case, g, g_ref in zip(("plain", "reset"), got, want, strict=True):
    for name, a, b in zip("x dt A B C h0".split(), g, g_ref, strict=True):
      assert np.all(np.isfinite(a)), (case, name)
      assert _rel_err(a, b) <= 1e-4, (case, name)


def test_segsum_matches_naive_difference_fp64():
  with jax.enable_x64(True):
    a = -jax.random.uniform(jax.random.key(0), (3, 17), jnp.float64)
    cum = jnp.cumsum(a, axis=-1)
    naive = cum[:, :, None] - cum[:, None, :]
    lower = np.tril(np.ones((17, 17), bool))
    got = segsum(a)
    np.testing.assert_allclose(np.asarray(got)[:, lower], np.asarray(naive)[:, lower], rtol=1e-12)
    assert np.all(np.isneginf(np.asarray(got)[:, ~lower]))


def test_padding_steps_leave_final_state_unchanged():
  """Δ = 0 steps appended at the end (what the chunked scan pads with) change nothing."""
  x, dt, A, B, C, h0 = _inputs(8, jnp.float32, **dict(SHAPE, T=24))
  pad = lambda a: jnp.concatenate([a, jnp.ones_like(a[:, :5])], axis=1)
  zero_dt = jnp.concatenate([dt, jnp.zeros_like(dt[:, :5])], axis=1)
  run = jax.jit(lambda *a: ssd_sequential(*a, initial_state=h0, return_final_state=True)[1])
  h, h_pad = run(x, dt, A, B, C), run(pad(x), zero_dt, A, pad(B), pad(C))
  np.testing.assert_array_equal(np.asarray(h_pad), np.asarray(h))


def test_bad_inputs_raise():
  x, dt, A, B, C, _ = _inputs(0, jnp.float32, **dict(SHAPE, G=3, H=4))
  with pytest.raises(ValueError, match="multiple of groups"):
    ssd_chunked(x, dt, A, B, C, chunk=8)
  x, dt, A, B, C, _ = _inputs(0, jnp.float32, **SHAPE)
  with pytest.raises(ValueError, match="positive integer"):
    ssd_chunked(x, dt, A, B, C, chunk=0)
  with pytest.raises(ValueError, match="initial_state"):
    ssd_chunked(x, dt, A, B, C, chunk=8, initial_state=jnp.zeros((2, 4, 3, 4)))
  with pytest.raises(ValueError, match="dt"):
    ssd_sequential(x, dt[:, :-1], A, B, C)


# State-collapse mitigations (Chen et al. 2024, "Stuffed Mamba", §5): lcjax.ssm.mitigations.


def _state_of_inputs_np(x, dt, A, B, reset, lo, t):
  """Σ_{s=lo..t} (∏_{u=s+1..t} α_u)(Δ_s x_s) B_sᵀ directly in numpy (resets drop older s)."""
  x, dt, A, B, reset = map(np.asarray, (x, dt, A, B, reset))
  Bz, _, H, P = x.shape
  R = H // B.shape[2]
  h = np.zeros((Bz, H, P, B.shape[-1]))
  for b in range(Bz):
    for s in range(lo, t + 1):
      if reset[b, s + 1 : t + 1].any():
        continue  # a reset after s discards input s
      log_decay_H = (dt[b, s + 1 : t + 1] * A).sum(0)
      B_HN = np.repeat(B[b, s], R, axis=0)
      h[b] += (
        np.exp(log_decay_H)[:, None, None]
        * (dt[b, s][:, None] * x[b, s])[..., None]
        * (B_HN[:, None])
      )
  return h


def test_window_state_difference_equals_state_of_last_r_inputs_fp64():
  """M3: h_t − (∏α)·h_{t−r} == the state built from only inputs t−r+1..t (fp64, ≤ 1e-10)."""
  from lcjax.ssm.mitigations import ssd_states, ssd_windowed, window_state_difference

  shape = dict(SHAPE, T=40)
  with jax.enable_x64(True):
    x, dt, A, B, C, h0 = _inputs(11, jnp.float64, **shape)
    reset_BT = jnp.zeros((shape["Bz"], shape["T"]), bool).at[1, 25].set(True)
    states = jax.jit(lambda h0, reset: ssd_states(x, dt, A, B, C, initial_state=h0, reset_BT=reset))
    for h_init, reset in ((None, None), (h0, None), (h0, reset_BT)):
      _, h_BTHPN = states(h_init, reset)
      reset_np = np.zeros(reset_BT.shape, bool) if reset is None else np.asarray(reset)
      a_BTH = jnp.where(reset_np[..., None], -jnp.inf, dt * A)
      for window in (1, 7, 30):
        hw_BTHPN = window_state_difference(h_BTHPN, a_BTH, window, h_init)
        for t in (0, window - 1, window, 24, 25, 26, shape["T"] - 1):
          lo = max(0, t - window + 1)
          want = _state_of_inputs_np(x, dt, A, B, reset_np, lo, t)
          assert _rel_err(hw_BTHPN[:, t], want) <= 1e-10, (window, t)
    # The outputs read the windowed states: y_t = h_t^(r) C_t.
    y, hw = ssd_windowed(x, dt, A, B, C, window=7, return_states=True)
    want_h = _state_of_inputs_np(x, dt, A, B, np.zeros(reset_BT.shape, bool), 33, 39)
    assert _rel_err(hw[:, -1], want_h) <= 1e-10
    want_y = np.einsum("bhpn,bhn->bhp", want_h, np.repeat(np.asarray(C[:, -1]), 2, axis=1))
    assert _rel_err(y[:, -1], want_y) <= 1e-10


def test_state_normalization_keeps_the_state_bounded():
  """M2: 1e5 random recurrent steps; the raw state grows without bound, the normalized one not."""
  steps, H, P, N, cap = 100_000, 2, 2, 3, 5.0
  A_H = -jnp.full((H,), 1e-3)  # almost no decay: the state integrates its inputs (a random walk)

  def run(state_norm_max):
    def step(h_BHPN, key):
      kx, kb = jax.random.split(key)
      x_BHP = 1.0 + jax.random.normal(kx, (1, H, P))  # a drift so the raw norm keeps growing
      B_BGN = 1.0 + jax.random.normal(kb, (1, 1, N))
      dt_BH = jnp.full((1, H), 1.0)
      _, h_BHPN = ssd_step(h_BHPN, x_BHP, dt_BH, A_H, B_BGN, B_BGN, state_norm_max=state_norm_max)
      return h_BHPN, jnp.sqrt(jnp.sum(jnp.square(h_BHPN), axis=(-2, -1)))

    keys = jax.random.split(jax.random.key(0), steps)
    _, norms_TBH = jax.jit(lambda k: jax.lax.scan(step, jnp.zeros((1, H, P, N)), k))(keys)
    return np.asarray(norms_TBH)

  raw, normed = run(None), run(cap)
  assert np.all(np.isfinite(normed)) and normed.max() <= cap * (1 + 1e-5)
  assert raw.max() > 100 * cap  # without M2 the state keeps growing
  assert raw[-1].max() > raw[steps // 10].max()


def test_forget_more_remember_less_factors_one_is_the_baseline_exactly():
  """M1 with both factors 1 returns the very same arrays; other factors scale the decay/input."""
  from lcjax.ssm.mitigations import forget_more_remember_less

  x, dt, A, B, C, _ = _inputs(12, jnp.float32, **SHAPE)
  A1, x1 = forget_more_remember_less(A, x, decay_scale=1.0, input_scale=1.0)
  assert A1 is A and x1 is x
  A2, x2 = forget_more_remember_less(A, x, decay_scale=2.0, input_scale=0.5)
  np.testing.assert_allclose(A2, 2 * A)
  np.testing.assert_allclose(x2, 0.5 * x)
  with pytest.raises(ValueError, match="decay_scale >= 1"):
    forget_more_remember_less(A, x, decay_scale=0.5)
