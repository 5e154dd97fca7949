"""State capacity and state collapse of tiny Mamba-2 models on passkey retrieval (a sweep).

  python scripts/sweep.py --config configs/mamba2_state_capacity.py:runlocal \
      --workdir runs/state_capacity                                  # ~10 min, 2 CPU cores
  python scripts/sweep.py --config configs/mamba2_state_capacity.py \
      --workdir runs/state_capacity_full                             # the full grid
  python scripts/sweep.py --config configs/mamba2_state_capacity.py:smoke --workdir /tmp/sc

Expect (the paper): `passkey_max_length` grows with the state size N, and past the
training length T the largest-N model's state norm (`state_norm_max@{p}`) keeps growing
unless a mitigation bounds it. At the runlocal budget (2 CPU cores) the models have not
learnt retrieval yet: README.md, "Mamba-2 and the state-capacity study", has the measured table.

Reproduces at small scale Chen et al. 2024, "Stuffed Mamba: State Collapse and State
Capacity of RNN-Based Long-Context Modeling" (arXiv:2410.07145): §6, the longest
context at which a 5-digit passkey is retrieved grows with N (exponentially in the
paper); §4, past the training length the state "collapses" (a few channels explode);
§5, the mitigations. The SSD layer is Dao & Gu 2024, "Transformers are SSMs".

Points (`sweep`): one training point `T{T}_N{N}` per (training length T, d_state N): a
2-layer Mamba-2 trained by `lcjax.train` on passkey rows (`data.synthetic.task=passkey`:
the `lcjax.eval.passkey` prompt + " " + the key, loss weight 1 on the 5 digits and
`lm_weight` on the rest, needle depth uniform), evaluated at the end on passkey accuracy
at `eval_multipliers` × T (lengths below the 248-token shortest prompt are dropped;
`eval/passkey_max_length` at ≥ 90%) and on its state norms over a 16×T prompt
(`eval.state_norms`). After the largest-N point of each T, the mitigations of §5 as
`lcjax.ssm.mitigations` model knobs, evaluated without training (eval-only points):
M1 `decay_scale` ("forget more") and `input_scale` ("remember less"), M2
`state_norm_max` (a fixed cap on each head's ‖h‖, `m2_state_norm_max`), M3
`state_window` = T (state norms only: `generate` has no windowed recurrence); and M4,
continual training of that model on 2T-token rows (a training point, `m4_steps` steps).

Outputs (WORKDIR): one run folder per point (eval/passkey.json, eval/state_norms.json,
plots/), results.csv / results.md (one row per point), plots/passkey_vs_length_T{T}.png
and plots/state_norm_vs_position_T{T}.png. Args: `runlocal` (≤ 20 min on 2 cores),
`smoke` (a one-layer model, 2 steps per point: every output in seconds), `steps=`.
"""

from lcjax.config import apply_overrides, parse_arg
from lcjax.data.tokenizers import ByteTokenizer
from lcjax.eval.passkey import shortest_passkey_prompt
from lcjax.models import mamba2_config
from lcjax.train.config import base_config

SHORTEST_PROMPT = shortest_passkey_prompt(ByteTokenizer())  # 248 bytes: shorter lengths drop


def _study(arg) -> dict:
  """The grid and budgets of `arg` (plain values, shared by get_config, sweep and plots)."""
  study = dict(
    d_states=(4, 8, 16, 32, 64),
    train_lengths=(512, 1024),
    eval_multipliers=(0.5, 1, 2, 4, 8, 16),
    depths=(0.1, 0.3, 0.5, 0.7, 0.9),
    trials=4,
    steps=2000,
    batch_size=16,
    lr=3e-3,
    warmup_steps=100,
    lm_weight=0.1,  # loss weight of the non-answer tokens (answer digits: 1)
    log_every=200,
    eval_batches=4,  # validation batches of answer loss (eval/loss) every log_every steps
    checkpoint_every=500,
    stats_per_train_length=8,  # state-norm samples per T tokens
    stats_multiplier=16,  # state norms over a prompt of 16·T tokens
    m1_decay_scale=2.0,  # M1 "forget more" (Chen et al. 2024 §5.1)
    m1_input_scale=0.5,  # M1 "remember less"
    # M2 (§5.2): a fixed cap on each head's ‖h‖; the runlocal N=64 model's largest head norm
    # is 0.57 within its training length and 0.71 beyond (measured), so 0.5 binds.
    m2_state_norm_max=0.5,
    m4_steps=500,  # M4: continual training at 2T (§5.4)
    model=dict(d_model=64, num_layers=2, head_dim=16),
  )
  if arg.runlocal:  # 2 CPU cores, ≤ 20 minutes
    study.update(
      d_states=(4, 16, 64),
      train_lengths=(320,),
      eval_multipliers=(1, 2, 4, 8, 16),
      depths=(0.2, 0.5, 0.8),
      trials=2,
      steps=600,
      batch_size=8,
      warmup_steps=30,
      log_every=100,
      m4_steps=150,
    )
  if arg.smoke:  # the fast test: a handful of steps, every output produced
    study.update(
      d_states=(2, 4),
      train_lengths=(256,),
      eval_multipliers=(0.5, 1),
      depths=(0.5,),
      trials=1,
      steps=2,
      batch_size=2,
      warmup_steps=1,
      log_every=2,
      eval_batches=1,
      checkpoint_every=2,
      stats_per_train_length=4,
      stats_multiplier=2,
      m4_steps=2,
      model=dict(d_model=32, num_layers=1, head_dim=16),
    )
  if arg.steps:
    study["steps"] = arg.steps
  return study


def _arg(arg):
  return parse_arg(arg, runlocal=False, smoke=False, steps=0)


def _point(study: dict, T: int, N: int) -> dict:
  """The overrides of the (T, N) training point: state size, row length, eval lengths."""
  lengths = [round(m * T) for m in study["eval_multipliers"]]
  return {
    "model.d_state": N,
    "data.seq_len": T,
    "train.loss_chunk": T,
    "eval.passkey.lengths": tuple(n for n in lengths if n >= SHORTEST_PROMPT),
    "eval.state_norms.length": study["stats_multiplier"] * T,
    "eval.state_norms.every": max(1, T // study["stats_per_train_length"]),
  }


def get_config(arg=None):
  arg = _arg(arg)
  study = _study(arg)
  T, N = study["train_lengths"][0], study["d_states"][-1]
  c = base_config()
  c.model = mamba2_config(
    vocab_size=384,  # the byte tokenizer
    expand=2,
    d_state=N,  # each point sets its own
    chunk_size=64,
    dtype="float32",
    **study["model"],  # 8 heads of 16 channels (d_model 64), each with an N-dim state
  )
  c.data.synthetic.update(task="passkey", lm_weight=study["lm_weight"])
  c.data.seq_len = T
  steps = max(study["steps"], study["warmup_steps"] + 1)
  c.train.update(
    steps=steps,
    batch_size=study["batch_size"],
    lr=study["lr"],
    warmup_steps=max(1, study["warmup_steps"]),
    schedule="cosine",
    min_lr_ratio=0.0,
    b2=0.999,
    weight_decay=0.01,
    grad_clip_norm=1.0,
    loss_chunk=T,
    log_every=study["log_every"],
  )
  c.checkpoint.update(every_steps=study["checkpoint_every"], keep=1, async_save=False)
  c.eval.update(every_steps=study["log_every"], batches=study["eval_batches"])
  c.eval.passkey.update(enabled=True, depths=study["depths"], trials=study["trials"])
  c.eval.state_norms.enabled = True
  apply_overrides(c, _point(study, T, N))  # the base is the first T's largest N
  return c


def _mitigations(study: dict, T: int) -> dict[str, dict]:
  """Eval-only overrides of M1-M3 (Chen et al. 2024 §5.1-5.3) on the largest-N model of T."""
  return {
    "m1_forget_more": {"model_overrides.decay_scale": study["m1_decay_scale"]},
    "m1_remember_less": {"model_overrides.input_scale": study["m1_input_scale"]},
    "m2_state_norm": {"model_overrides.state_norm_max": study["m2_state_norm_max"]},
    "m3_window": {"model_overrides.state_window": T, "eval.passkey.enabled": False},
  }


def _m4_name(T: int, N: int) -> str:
  return f"T{T}_N{N}_m4_train{2 * T}"


def sweep(add, arg=None):
  study = _study(_arg(arg))
  for T in study["train_lengths"]:
    for N in study["d_states"]:
      add(f"T{T}_N{N}", **_point(study, T, N))
    N = study["d_states"][-1]
    base, after = _point(study, T, N), f"T{T}_N{N}"
    for name, overrides in _mitigations(study, T).items():
      add(f"{after}_{name}", after=after, eval_only=True, **base, **overrides)
    m4 = {  # M4 (§5.4): continual training on longer rows; evaluated at the same lengths
      "data.seq_len": 2 * T,
      "train.loss_chunk": 2 * T,
      "train.steps": max(study["m4_steps"], 2),
      "train.warmup_steps": 1,
    }
    add(_m4_name(T, N), after=after, **{**base, **m4})


def metrics(arg=None):
  del arg
  return [
    "eval/passkey@*",
    "eval/passkey_max_length",
    "eval/state_norm_max*",
    "eval/state_abs_max",
    "eval/loss",
  ]


def plots(arg=None):
  study = _study(_arg(arg))
  out = []
  for T in study["train_lengths"]:
    N = study["d_states"][-1]
    points = [f"T{T}_N{n}" for n in study["d_states"]]
    points += [f"T{T}_N{N}_{m}" for m in _mitigations(study, T)] + [_m4_name(T, N)]
    out.append(
      dict(
        file=f"passkey_vs_length_T{T}.png",
        metric="eval/passkey@{x}",
        points=points,
        title=f"passkey accuracy, trained at {T} tokens",
        xlabel="context length (tokens)",
        ylabel="passkey accuracy",
      )
    )
    out.append(
      dict(
        file=f"state_norm_vs_position_T{T}.png",
        metric="eval/state_norm_max@{x}",
        points=points,
        title=f"largest head state norm, trained at {T} tokens",
        xlabel="position (tokens)",
        ylabel="max ‖h‖ over layers and heads",
        logy=True,
      )
    )
  return out
