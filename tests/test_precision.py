"""The bf16 RoPE study (lcjax.eval.precision, configs/bf16_rope.py) at tiny sizes."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lcjax.attention import MaskSpec
from lcjax.config import load_config
from lcjax.eval import precision
from lcjax.models import build_model, llama_config
from lcjax.models.transformer import layer_rope
from lcjax.positional.rope import compute_inv_freq, rope_cos_sin
from lcjax.sweep import load_sweep, run_sweep
from lcjax.train.run_model import model_from_params

DELTAS = (0, 1, 4096, 65536)


@pytest.fixture(scope="module")
def smoke():
  """configs/bf16_rope.py:smoke (its sizes, so the compiled programs are shared)."""
  return load_config("configs/bf16_rope.py:smoke")


@pytest.fixture(scope="module")
def kernel(smoke):
  args = {**smoke.eval.bf16_rope.kernel.to_dict(), "logit_deltas": DELTAS}
  return precision.kernel_shift_study(**{**args, "softmax_deltas": (0, 4096)})


def test_fp32_is_exact_at_zero_and_near_invariant_for_small_shifts(kernel):
  for path, values in kernel["logit"].items():
    assert values[0] == 0.0, path  # Δ = 0 recomputes the same logits bit for bit
  fp32, hf_angles = kernel["logit"]["fp32"], kernel["logit"]["fp32_hf_angles"]
  assert hf_angles[1] < 1e-5
  assert max(fp32) < 1e-6  # lcjax's exact angles: the fp32 rotation alone is ~1e-7
  assert hf_angles[3] > 30 * fp32[3]  # at Δ=65,536 HF's fp32 angle rounding shows


def test_bf16_paths_break_invariance_and_hf_is_worse_than_lcjax(kernel):
  hf, ours, fp32 = (kernel["logit"][p] for p in ("hf_bf16", "lcjax_bf16", "fp32"))
  for i in range(1, len(DELTAS)):
    assert hf[i] > 1.2 * ours[i] > 10 * fp32[i], (DELTAS[i], hf[i], ours[i], fp32[i])
  for kind in ("sink", "nosink"):
    for per_length in kernel["softmax"][kind]["hf_bf16"]["l1"]:
      assert per_length[0] == 0.0  # softmax_deltas[0] = 0
  hf_sink = kernel["softmax"]["sink"]["hf_bf16"]["l1"]
  ours_sink = kernel["softmax"]["sink"]["lcjax_bf16"]["l1"]
  assert all(h[1] > o[1] for h, o in zip(hf_sink, ours_sink, strict=True))


def test_the_sink_makes_the_bf16_change_grow_with_length(kernel):
  assert kernel["sink_mass"][0] > kernel["sink_mass"][1] > 0.5
  sink = [row[1] for row in kernel["softmax"]["sink"]["lcjax_bf16"]["l1"]]
  nosink = [row[1] for row in kernel["softmax"]["nosink"]["lcjax_bf16"]["l1"]]
  assert sink[1] > 3 * sink[0]  # the sink's mass falls with L: its logit error shows more
  assert 0.7 < nosink[1] / nosink[0] < 1.4  # without a sink the change is flat in L


def test_hf_bf16_rope_rounds_every_op_like_torch(kernel):
  """Against numpy on ml_dtypes bf16 arrays, where each op rounds to bf16 (torch's rule)."""
  del kernel  # its compiled rotations ([512, 32]: the smoke pairs) are reused here
  x_ND = np.random.default_rng(1).standard_normal((512, 32)).astype(np.float32)
  positions = np.arange(512) * 997 + 100_000
  inv_freq_K, _ = compute_inv_freq({"rope_type": "default", "rope_theta": 10000.0}, 32)
  ours = np.asarray(precision.rotate(x_ND, positions, "hf_bf16", inv_freq_K))
  hf_cos_sin = rope_cos_sin(inv_freq_K, 1.0, positions[None], exact_angles=False)
  cos_NK, sin_NK = (np.asarray(t[0]) for t in hf_cos_sin)
  bf16 = ml_dtypes.bfloat16
  x = x_ND.astype(bf16)
  cos, sin = np.tile(cos_NK, 2).astype(bf16), np.tile(sin_NK, 2).astype(bf16)
  reference = (x * cos + np.concatenate([-x[:, 16:], x[:, :16]], -1) * sin).astype(np.float32)
  np.testing.assert_array_equal(ours, reference)
  lcjax = np.asarray(precision.rotate(x_ND, positions, "lcjax_bf16", inv_freq_K))
  assert np.mean(ours != lcjax) > 0.1  # the two bf16 paths round differently


def test_hf_angle_rounding_grows_to_a_sixty_fourth_of_a_radian_at_512k_and_lcjax_has_none():
  angles = precision.angle_rounding(head_dim=32, starts=(4096, 524288), span=256)
  small, large = angles["product_rounding"]
  assert small < 2.5e-4  # fp32 spacing 2^-11 at angles near 4096
  assert 0.01 < large <= 2**-6 + 1e-6  # half of 2^-5, the spacing at angles in [2^18, 2^19)
  assert angles["hf_table_error"][1] >= 0.9 * large
  # lcjax's exact angles: float32 cos/sin of an angle in [-π, π] (ulp 2^-22 near π).
  assert max(angles["table_error"]) < 1e-6


def test_bad_inputs_fail_with_one_clear_error(smoke):
  with pytest.raises(ValueError, match="rotation path 'bf8'"):
    precision.rotate(np.zeros((2, 4), np.float32), np.arange(2), "bf8", np.ones(2, np.float32))
  with pytest.raises(ValueError, match="deltas must be shifts > 0"):
    precision.model_shift_study(None, np.zeros(8, np.int32), deltas=(0,), contexts=(8,))
  with pytest.raises(ValueError, match="contexts must lie in"):
    precision.model_shift_study(None, np.zeros(8, np.int32), deltas=(1,), contexts=(16,))
  with pytest.raises(ValueError, match="lower eval.bf16_rope.length"):
    precision.held_out_tokens(smoke.data, 10**9)


TINY = dict(
  d_model=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=64,
  initializer_range=0.3,  # logits of order 1: attention that is not uniform
  attention_block_q=32,
  attention_block_kv=32,
)


@nnx.jit(static_argnames="anchor")
def _probs_and_layer_outputs(model, tokens, positions, segments, rows, anchor):
  """attention_probs (all rows and some) and, per layer, o_proj(probs @ v) beside the
  layer's own attention output on the same input."""
  probs = precision.attention_probs(model, tokens, positions, segment_ids_BT=segments)
  some = precision.attention_probs(model, tokens, positions, segment_ids_BT=segments, rows_R=rows)
  rope = model.rope_tables(positions)
  x = model.embed_tokens(tokens)
  pairs = []
  for i in range(len(probs)):
    layer, rope_i = model.layer(i), layer_rope(rope, model._layer_scaled(i))
    h, attn = layer.input_layernorm(x), layer.self_attn
    mask = MaskSpec(causal=True, document=True, anchor=anchor)
    expected, _ = attn(h, rope_i, mask=mask, segment_ids_BT=segments, q_index_BT=None)
    v = jnp.repeat(attn.v_proj(h).reshape(*tokens.shape, 2, 8), 2, axis=2)  # head h: kv h // 2
    out = jnp.einsum("bhts,bshd->bthd", probs[i], v).reshape(*tokens.shape, -1)
    pairs.append((attn.o_proj(out), expected))
    x = layer(
      x, rope_i, anchor=anchor, segment_ids_BT=segments, q_index_BT=None, cache=None, cache_index=0
    )[0]
  return probs, some, pairs


def test_attention_probs_are_the_layers_own_attention():
  """probs @ v through o_proj equals each layer's attention output (packed documents, an
  anchor; the study's one-document rows use the same code with fewer mask parts)."""
  anchor = True
  model = build_model(llama_config(dtype="float32", anchor=anchor, **TINY), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 24)), jnp.int32)
  segments = jnp.asarray([[0] * 10 + [1] * 14], jnp.int32)
  positions = jnp.asarray(np.arange(24)[None] + 1000, jnp.int32)
  rows = jnp.asarray([3, 11, 23])
  probs, some, pairs = _probs_and_layer_outputs(model, tokens, positions, segments, rows, anchor)
  for p, p_rows, (ours, expected) in zip(probs, some, pairs, strict=True):
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(p_rows, p[:, :, rows], atol=1e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    # Row 15 (second document) sees the anchor (key 0) and its own document only.
    assert float(p[0, :, 15, 0].min()) > 0 and float(p[0, :, 15, 1:10].max()) == 0.0


@pytest.fixture(scope="module")
def evaluation(smoke, tmp_path_factory):
  """The study on a random tiny model with the smoke settings, shifted up to 65,536."""
  settings = smoke.eval.bf16_rope.to_dict()
  settings["deltas"] = (16, 65536)
  cfg = llama_config(dtype="float32", **TINY)
  params = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  workdir = str(tmp_path_factory.mktemp("bf16_rope"))
  summary, lines = precision.bf16_rope_evaluation(
    settings, params, cfg, smoke.data, workdir, model_from_params=model_from_params
  )
  return summary, lines, workdir


def test_model_shift_study_on_a_tiny_model(evaluation):
  model = evaluation[0]["model"]
  res = model["results"]
  assert set(res) == {
    "global/fp32",
    "global/bf16",
    "global/fp32_hf_angles",
    "anchor/fp32",
    "anchor/bf16",
  }
  mean = lambda name, key, d: float(np.mean(res[name][key][d]))  # noqa: E731
  hf_angles = [mean("global/fp32_hf_angles", "l1", d) for d in range(2)]
  fp32 = [mean("global/fp32", "l1", d) for d in range(2)]
  bf16 = [mean("global/bf16", "l1", d) for d in range(2)]
  assert max(fp32) < 1e-5 and hf_angles[0] < 1e-5
  assert hf_angles[1] > 10 * max(fp32)  # HF's fp32 angle rounding at Δ = 65,536
  assert all(b > 10 * f for b, f in zip(bf16, fp32, strict=True))
  assert mean("global/bf16", "l1_vs_fp32", 0) > 10 * fp32[0]
  # Holding the first token at 0 changes its distance to every query: not relative.
  assert mean("anchor/fp32", "l1", 0) > 100 * fp32[0]
  assert mean("anchor/fp32", "l1_nofirst", 0) < mean("anchor/fp32", "l1", 0)
  mass = np.asarray(res["global/fp32"]["first_mass"])
  assert mass.shape == (2, 3) and np.all((mass > 0) & (mass < 1))


def test_bf16_rope_evaluation_writes_every_output(evaluation, smoke):
  summary, lines, workdir = evaluation
  with open(os.path.join(workdir, "eval", "bf16_rope.json")) as f:
    saved = json.load(f)
  assert saved["checks"] == json.loads(json.dumps(summary["checks"]))
  assert os.path.getsize(os.path.join(workdir, "plots", "bf16_rope_shift.png")) > 10_000
  assert lines["eval/bf16_rope/logit_fp32@65536"] == saved["kernel"]["logit"]["fp32"][-1]
  assert lines["eval/bf16_rope/model_global_bf16_l1@65536"] > 0
  assert saved["model"]["length"] == smoke.eval.bf16_rope.length
  text = precision.format_tables(saved)
  assert "lcjax_bf16 nosink" in text and "anchor/bf16 vs fp32" in text
  ppl = saved["perplexity"]
  assert ppl["deltas"] == [0, 524288] and ppl["window"] == 32
  assert lines["eval/bf16_rope/ppl_fp32_hf_angles@524288"] == ppl["ppl"]["fp32_hf_angles"][1]
  assert "perplexity of the file at positions shifted" in text


def test_shift_perplexity_is_flat_with_exact_angles_and_moves_with_hf_angles(evaluation):
  """RoPE makes the loss independent of a shift; only the arithmetic can change it."""
  ppl = evaluation[0]["perplexity"]
  fp32, hf = ppl["ppl"]["fp32"], ppl["ppl"]["fp32_hf_angles"]
  assert fp32[0] == pytest.approx(hf[0], rel=1e-6)  # the same model at Δ = 0
  assert abs(fp32[1] / fp32[0] - 1) < 1e-5  # fp32 noise of the rotation only
  assert abs(hf[1] / hf[0] - 1) > 10 * abs(fp32[1] / fp32[0] - 1)
  checks = evaluation[0]["checks"]
  assert checks["ppl_change_fp32"] == pytest.approx(abs(fp32[1] / fp32[0] - 1))


@pytest.mark.slow
def test_sweep_smoke_writes_the_figure(tmp_path):
  """scripts/sweep.py --config configs/bf16_rope.py:smoke: pretrain, then the study."""
  result = run_sweep(load_sweep("configs/bf16_rope.py:smoke"), str(tmp_path))
  assert result["ran"] == ["pretrain", "bf16_rope"]
  assert os.path.getsize(tmp_path / "plots" / "bf16_rope_shift.png") > 10_000
  with open(tmp_path / "bf16_rope" / "eval" / "bf16_rope.json") as f:
    assert json.load(f)["model"]["layers"] == 2
