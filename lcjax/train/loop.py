"""`train(config, workdir)`: the whole training run, callable from scripts and notebooks.

Order of work: validate the config (nothing traced yet) → write config.json →
build the model (random or `init_from`) and optimizer → restore the newest
complete checkpoint if there is one → loop (step, log, evaluate, checkpoint) →
final checkpoint and evaluations. SIGTERM/SIGINT finish the current step, save
and exit cleanly; a NaN/inf loss stops the run before anything is saved.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from lcjax import data as lcdata
from lcjax.interop.native import write_model_config
from lcjax.parallel.distributed import gather_json, process_local_to_global
from lcjax.parallel.layouts import apply_layout
from lcjax.parallel.mesh import make_mesh
from lcjax.parallel.sharding import batch_sharding, tree_shardings
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.config import validate_config
from lcjax.train.evaluate import final_evaluations
from lcjax.train.flops import flops_per_token, peak_flops
from lcjax.train.metrics import MetricsWriter, write_run_config
from lcjax.train.optim import make_optimizer
from lcjax.train.progress import Progress
from lcjax.train.run_model import (
  BATCH_KEYS,
  RunSetup,
  build_run_model,
  run_train_step,
)
from lcjax.train.step import init_state, make_eval_step

__all__ = ["train", "TrainingDiverged"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is left as it was."""


class _NullWriter:
  """Processes other than 0 log nothing."""

  def write(self, step, metrics) -> None:
    del step, metrics

  def close(self) -> None:
    pass


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`.

  Returns the last logged metrics and `step`, the step the run reached (below
  `train.steps` when a signal stopped it).
  """
  validate_config(config)
  mesh = make_mesh(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0  # only process 0 writes run outputs

  model, model_cfg = build_run_model(config)
  if primary:
    write_run_config(config, workdir)
    write_model_config(model_cfg, workdir)
  graphdef, _ = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  tx, schedule = make_optimizer(config.train, params)
  state = init_state(model, tx, config.train.seed)
  setup = RunSetup(model_cfg, graphdef, tx, schedule, jax.tree.map(_abstract, state), n_params)
  del model

  checkpointer = Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  data_iter = lcdata.make_train_iterator(
    config.data,
    batch_size=config.train.batch_size // jax.process_count(),  # per-process rows
    seed=config.train.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  restored = checkpointer.restore_latest(setup.state)
  start_step = 0
  if restored is not None:
    start_step, state, data_states = restored
    data_iter.set_state(data_states[str(jax.process_index())])
    if primary:
      print(f"resumed from {checkpointer.directory}/{start_step}")
  elif config.train.carry_optimizer_state:
    state = _carry_optimizer_state(config.init_from, state, setup.state, quiet=not primary)

  # FSDP / tensor-parallel shardings from the path rules; rows over (data, fsdp), the
  # sequence over context (in the layout's order).
  state = jax.device_put(state, tree_shardings(state, mesh))
  prepare = _batch_preparer(mesh, config.parallel.layout)
  train_step = run_train_step(config, setup)
  eval_step = make_eval_step(graphdef, loss_chunk=config.train.loss_chunk)
  seq_len = config.data.seq_len
  fpt = flops_per_token(model_cfg, n_params, seq_len)
  peak = peak_flops(config.train.peak_flops)
  writer = MetricsWriter(workdir, resume_step=start_step) if primary else _NullWriter()
  progress = Progress(
    config.train.steps, start_step, every=config.train.log_every, quiet=not primary
  )
  progress.message(
    f"model: {model_cfg.family}, {n_params:,} params; data: {_data_name(config.data)}, "
    f"seq_len {seq_len}, batch {config.train.batch_size}; "
    f"steps {start_step}->{config.train.steps}; mesh {dict(mesh.shape)}"
  )

  last: dict[str, Any] = {}
  step = start_step
  with _StopFlag() as stop, jax.set_mesh(mesh):
    t_last, tokens_since = time.time(), 0
    while step < config.train.steps:
      batch = next(data_iter)
      batch = prepare(batch)
      state, metrics = train_step(state, batch)
      step += 1
      tokens_since += int(np.prod(batch["tokens"].shape))
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        writer.write(step, {"loss": loss})
        writer.close()
        checkpointer.close()
        raise TrainingDiverged(
          f"loss is {loss} at step {step}; the last good checkpoint is kept in "
          f"{checkpointer.directory} — lower train.lr, raise train.warmup_steps, or check the data"
        )
      if step % config.train.log_every == 0 or step == config.train.steps:
        elapsed = max(time.time() - t_last, 1e-9)
        tps = tokens_since / elapsed
        last = {k: float(v) for k, v in metrics.items()}
        last.update(tokens_per_sec=tps, mfu=fpt * tps / peak)
        last.update({f"data/{k}": v for k, v in _flat_stats(data_iter.stats()).items()})
        writer.write(step, last)
        progress.update(step, loss, tps)
        t_last, tokens_since = time.time(), 0
      if config.eval.every_steps and step % config.eval.every_steps == 0:
        writer.write(step, _validation_loss(config, eval_step, prepare, state["params"]))
      save_now = step % config.checkpoint.every_steps == 0 or step == config.train.steps
      if save_now or stop.signal:
        checkpointer.save(step, state, gather_json(data_iter.get_state()))
      if stop.signal:
        progress.message(f"{stop.signal}: saved step {step}; rerun the same command to resume")
        break
  checkpointer.close()
  writer.close()
  if step >= config.train.steps and jax.process_count() > 1:
    if primary:
      print("multi-process run: evaluate with `python scripts/eval.py` in one process")
  elif step >= config.train.steps:
    final_evaluations(config, workdir, state["params"], model_cfg, step)
  return {**last, "step": step}


def _carry_optimizer_state(run_dir: str, state, abstract_state, *, quiet: bool):
  """`state` with the optimizer state of `run_dir`'s newest checkpoint (carry_optimizer_state).

  The parameters are already `run_dir`'s (`init_from`); the step and RNG stay this run's,
  so the learning-rate schedule restarts while AdamW's moments and count continue.
  """
  previous = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=1_000_000, async_save=False)
  try:
    step, carried = previous.restore_state(abstract_state)
  finally:
    previous.close()
  if not quiet:
    print(f"optimizer state carried over from {previous.directory}/{step}")
  return {**state, "opt_state": carried["opt_state"]}


def _data_name(data) -> str:
  """What the rows are: the source kind, or the synthetic task (`lcjax.data.synthetic`)."""
  task = data.get("synthetic", {}).get("task")
  return f"synthetic {task}" if task else str(data.source.get("kind"))


def _flat_stats(stats: dict, prefix: str = "") -> dict[str, float]:
  """{'documents': 3, 'sources': {'long': {...}}} -> {'documents': 3, 'sources/long/...': ...}."""
  flat = {}
  for key, value in stats.items():
    if isinstance(value, dict):
      flat.update(_flat_stats(value, f"{prefix}{key}/"))
    elif isinstance(value, int | float):
      flat[f"{prefix}{key}"] = value
  return flat


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _batch_preparer(mesh, layout: str):
  """Host batch -> device arrays: context layout applied once, then sharded."""
  context = mesh.shape["context"]
  sharding = batch_sharding(mesh)

  def prepare(batch):
    batch = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
    if context > 1:
      # Tokens, targets, positions, segment ids and weights move together; token_index
      # keeps the global order for the masks (lcjax.parallel.layouts).
      batch = apply_layout(batch, context, layout)
    return {k: process_local_to_global(v, sharding) for k, v in batch.items()}

  return prepare


def _validation_loss(config, eval_step, prepare, params) -> dict[str, float]:
  """Mean loss over `eval.batches` packed batches of the validation split."""
  data = config.data.copy_and_resolve_references()
  data.split = "validation"
  it = lcdata.make_train_iterator(
    data,
    batch_size=config.train.batch_size // config.train.grad_accum // jax.process_count(),
    seed=0,
  )
  nll = weight = 0.0
  for _ in range(config.eval.batches):
    n, w = eval_step(params, prepare(next(it)))
    nll, weight = nll + float(n), weight + float(w)
  loss = nll / max(weight, 1.0)
  return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
