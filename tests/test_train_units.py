"""Trainer pieces: chunked cross-entropy, gradient accumulation, schedules, freezing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lcjax.config import ConfigError
from lcjax.data.packing import row_loss_weights
from lcjax.models import build_model, llama_config
from lcjax.train.loss import chunked_cross_entropy, cross_entropy_reference
from lcjax.train.optim import make_optimizer, make_schedule, param_labels
from lcjax.train.step import init_state, make_train_step


def _tc(**kw):
  base = dict(
    steps=100,
    lr=1e-3,
    warmup_steps=10,
    schedule="cosine",
    min_lr_ratio=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.1,
    grad_clip_norm=1.0,
    freeze=(),
    trainable=(),
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_cross_entropy_matches_full_logits(chunk):
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
  w_head = jnp.asarray(rng.standard_normal((8, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, size=(2, 16)))
  weights = jnp.asarray(rng.uniform(size=(2, 16)) > 0.3, jnp.float32)

  def chunked(h, w):
    return chunked_cross_entropy(lambda x: x @ w, h, targets, weights, chunk=chunk)[0]

  def full(h, w):
    return cross_entropy_reference(h @ w, targets, weights)[0]

  np.testing.assert_allclose(chunked(h, w_head), full(h, w_head), rtol=1e-6)
  g_chunked = jax.grad(chunked, argnums=(0, 1))(h, w_head)
  g_full = jax.grad(full, argnums=(0, 1))(h, w_head)
  for a, b in zip(g_chunked, g_full, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_warmup_then_cosine_to_floor():
  s = make_schedule(_tc())
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s(100)), 1e-4, rtol=1e-5)
  assert float(s(55)) < float(s(20))
  with pytest.raises(ConfigError, match="train.schedule"):
    make_schedule(_tc(schedule="step"))


def _batch(rows=4, T=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 384, size=(rows, T + 1))
  seg = np.repeat(np.array([[1] * 9 + [2] * 7]), rows, axis=0)
  weights = np.ones((rows, T), np.float32)
  weights[:, 8] = 0  # document end
  return dict(
    tokens=jnp.asarray(tokens[:, :-1], jnp.int32),
    targets=jnp.asarray(tokens[:, 1:], jnp.int32),
    segment_ids=jnp.asarray(seg, jnp.int32),
    positions=jnp.asarray(np.concatenate([np.arange(9), np.arange(7)])[None].repeat(rows, 0)),
    loss_weights=jnp.asarray(weights),
  )


def test_gradient_accumulation_equals_one_big_batch():
  model = build_model(llama_config(dtype="float32"), rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  # Plain SGD with lr 1: the parameter change is the gradient itself. (Adam's first
  # step is ~lr*sign(g), which amplifies fp32 rounding in near-zero gradients.)
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  results = []
  for accum in (1, 4):
    step = make_train_step(graphdef, tx, schedule, grad_accum=accum, loss_chunk=8)
    state, metrics = step(init_state(model, tx, seed=0), _batch())
    results.append((state["params"], metrics))
  (p1, m1), (p4, m4) = results
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p4)


def test_document_weighting_loss_is_the_mean_over_documents_with_grad_accum():
  """LWM weighting in the train step (issue #14's example): row A holds one document with 7 loss
  tokens, row B four with 1 each. The step's loss, with one batch or with grad_accum=2 splitting
  the two rows, is the mean over the 5 documents of each one's mean NLL (each weighs 1/5)."""
  seg = np.array([[1] * 7 + [0], [1, 2, 3, 4, 0, 0, 0, 0]], np.int32)
  weights = np.stack([row_loss_weights(s, s > 0, "document") for s in seg])
  doc = np.where(seg > 0, seg - 1 + np.array([[0], [1]]), -1)  # batch-wide document index
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 256, size=(2, 9))
  batch = dict(
    tokens=jnp.asarray(tokens[:, :-1], jnp.int32),
    targets=jnp.asarray(tokens[:, 1:], jnp.int32),
    segment_ids=jnp.asarray(seg),
    positions=jnp.asarray(np.tile(np.arange(8), (2, 1)), jnp.int32),
    loss_weights=jnp.asarray(weights),
  )
  model = build_model(llama_config(dtype="float32"), rngs=nnx.Rngs(0))
  logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -np.asarray(jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0])
  per_document = np.mean([nll[doc == d].mean() for d in range(5)])
  graphdef, _ = nnx.split(model, nnx.Param)
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  results = []
  for accum in (1, 2):
    step = make_train_step(graphdef, tx, schedule, grad_accum=accum, loss_chunk=8)
    state, metrics = step(init_state(model, tx, seed=0), batch)
    np.testing.assert_allclose(metrics["loss"], per_document, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_tokens"], 5.0, rtol=1e-6)  # documents, not tokens
    results.append(state["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *results)


def test_freeze_by_regex_keeps_frozen_params_fixed():
  model = build_model(llama_config(dtype="float32"), rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tc = _tc(warmup_steps=0, freeze=(r".*",), trainable=(r"embed_tokens", r"norm"))
  labels = param_labels(params, tc)
  assert labels["embed_tokens"]["embedding"] == "trainable"
  # Stacked layers (model.scan_layers): the regexes see per-layer names.
  assert labels["layers"]["input_layernorm"]["scale"] == "trainable"
  assert labels["layers"]["self_attn"]["q_proj"]["kernel"] == "frozen"
  tx, schedule = make_optimizer(tc, params)
  step = make_train_step(graphdef, tx, schedule, grad_accum=1, loss_chunk=16)
  new, _ = step(init_state(model, tx, seed=0), _batch())
  q_before = params["layers"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(new["params"]["layers"]["self_attn"]["q_proj"]["kernel"], q_before)
  assert not np.array_equal(
    new["params"]["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"]
  )
  with pytest.raises(ConfigError, match="every parameter"):
    make_optimizer(_tc(freeze=(r".*",)), params)
  # A regex over per-layer names: all layers of the stack, or some (refused), or one
  # layer of an unrolled model.
  labels = param_labels(params, _tc(freeze=(r"layers/\d+/mlp",)))
  assert labels["layers"]["mlp"]["up_proj"]["kernel"] == "frozen"
  with pytest.raises(ConfigError, match="select some layers of 'layers/mlp/.*_proj/kernel'"):
    param_labels(params, _tc(freeze=(r"layers/1/mlp",)))
  unrolled = build_model(llama_config(scan_layers=False), rngs=nnx.Rngs(0))
  labels = param_labels(
    nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)), _tc(freeze=(r"layers/1/",))
  )
  assert labels["layers"][1]["mlp"]["up_proj"]["kernel"] == "frozen"
  assert labels["layers"][0]["mlp"]["up_proj"]["kernel"] == "trainable"


def _records(path):
  """The TFRecords of an event file, checking both masked CRC-32Cs of every record."""
  import struct

  from lcjax.train.tensorboard import _masked_crc

  data, out, i = open(path, "rb").read(), [], 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i : i + 8])
    assert struct.unpack("<I", data[i + 8 : i + 12])[0] == _masked_crc(data[i : i + 8])
    record = data[i + 12 : i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length : i + 16 + length])[0] == _masked_crc(record)
    out.append(record)
    i += 16 + length
  return out


def test_tensorboard_event_files_decode_with_tensorboard_protos(tmp_path):
  """lcjax's hand-encoded Event protos read back with tensorboardX's generated event_pb2
  (the oracle), including the resume's purge marker; CRC-32C has its known check value."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  from lcjax.train.metrics import MetricsWriter
  from lcjax.train.tensorboard import crc32c

  assert crc32c(b"123456789") == 0xE3069283
  writer = MetricsWriter(str(tmp_path), resume_step=0)
  writer.write(1, {"loss": 2.5, "lr": 3e-4, "note": "text"})
  writer.write(2, {"loss": 2.25, "eval/ppl@64/yarn": 11.5})
  writer.close()
  resumed = MetricsWriter(str(tmp_path), resume_step=1)  # the metrics.jsonl keeps step 1
  resumed.write(2, {"loss": 2.0})
  resumed.close()
  first, second = sorted((tmp_path / "tensorboard").iterdir())
  events = [event_pb2.Event.FromString(r) for r in _records(first)]
  assert events[0].file_version == "brain.Event:2"
  scalars = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
  assert scalars[0][0] == 1 and scalars[0][1]["loss"] == 2.5
  assert scalars[0][1]["lr"] == pytest.approx(3e-4) and "note" not in scalars[0][1]
  assert scalars[1] == (2, {"loss": 2.25, "eval/ppl@64/yarn": 11.5})
  events = [event_pb2.Event.FromString(r) for r in _records(second)]
  assert events[1].step == 2 and events[1].session_log.status == event_pb2.SessionLog.START
  assert events[2].step == 2 and events[2].summary.value[0].simple_value == 2.0
