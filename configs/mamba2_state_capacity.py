"""State capacity of tiny Mamba-2 models: MQAR recall vs. state size N, then passkey (a sweep).

  python scripts/sweep.py --config configs/mamba2_state_capacity.py:runlocal \
      --workdir runs/state_capacity                    # 16.6 min, 2 CPU cores (README)
  python scripts/sweep.py --config configs/mamba2_state_capacity.py \
      --workdir runs/state_capacity_full                             # the full grid
  python scripts/sweep.py --config configs/mamba2_state_capacity.py:smoke --workdir /tmp/sc

Expect (notes/studies.md §4): the MQAR capacity (the largest number of key-value pairs K
recalled with ≥ 80% value accuracy, `mqar_threshold`) does not decrease with N, accuracy at
K=16 is ≥ 30 points higher for N=64 than for N=4, and the attention control is ≥ 90% at
K=16. README.md, "Mamba-2 and the state-capacity study", has the measured table.

Reproduces at small scale Chen et al. 2024, "Stuffed Mamba: State Collapse and State
Capacity of RNN-Based Long-Context Modeling" (arXiv:2410.07145; thunlp/stuffed-mamba): §6,
the amount of context an RNN recalls grows with its state size N; §4, past the training
length the state "collapses"; §5, the mitigations. The recall task is multi-query
associative recall (MQAR, Arora et al. 2023, "Zoology", arXiv:2312.04927; HazyResearch/
zoology `zoology/data/associative_recall.py`): Zoology's recall-vs-state-size frontier,
with attention as the model whose "state" (the KV cache) grows with the context. The SSD
layer is Dao & Gu 2024, "Transformers are SSMs".

Points (`sweep`), every one trained by `lcjax.train` and evaluated at the end:
- `mqar_N{N}`: a 2-layer d64 Mamba-2 (8 heads of 16 channels, each with an N-dim state)
  trained on `data.synthetic.task=mqar` rows (64 key and 64 value tokens, K ~ U[1, 16]
  pairs, SEP, 16 queries, loss on the values only; batch 64, AdamW `lr` cosine), then
  `eval.mqar`: value accuracy at K ∈ `mqar_pairs` (`eval/mqar@{K}`) and `eval/mqar_capacity`.
- `mqar_attention`: the control of equal width d64, Zoology's attention baseline (a short
  convolution, then attention without position embeddings; `_attention`): a Mamba-2 layer
  with N=4 for its convolution, then one full-attention layer (1 head of 64, NoPE), MLP 128,
  at its own `attention_lr` and `attention_steps`, on the same rows and evaluation.
- `passkey_N{N}`: `mqar_N{N}`'s model trained on, starting from its final checkpoint,
  `data.synthetic.task=token_passkey` (single-token digits, 2–3 digit keys, uniform random
  filler, one MARK token before the needle's key and as the question, example length growing
  from T/4 to T over the first `curriculum_fraction` of training): the passkey is recall of the
  tokens after an earlier MARK, the circuit MQAR trained. Then `eval.token_passkey` at
  `passkey_multipliers` × T (`eval/token_passkey_max_length`: the longest length with ≥ 90%)
  and `eval.state_norms` over a 16·T token-passkey prompt.
- After the largest-N passkey point, eval-only points with the mitigations of §5 as
  `lcjax.ssm.mitigations` model knobs on its weights: M1 `decay_scale` ("forget more") and
  `input_scale` ("remember less"), M2 `state_norm_max` (`m2_state_norm_max`), M3
  `state_window` = T; the full grid adds M4, continual training at 2T (`m4_steps`).

Outputs (WORKDIR): one run folder per point (eval/mqar.json, eval/token_passkey.json,
eval/state_norms.json, plots/loss_curve.png, ...), results.csv / results.md (one row per
point: `d_state`, `mqar@{K}`, `mqar_capacity`, `token_passkey@{L}`, state norms), and
plots/mqar_accuracy_vs_pairs.png, plots/mqar_capacity_vs_d_state.png,
plots/token_passkey_vs_length.png, plots/token_passkey_max_length_vs_d_state.png,
plots/state_norm_vs_position.png. Args: `runlocal` (≤ 20 min on 2 cores), `smoke` (a
one-layer model, a few steps per point: every output in seconds), `steps=` (MQAR steps),
`passkey_steps=`, `lr=`, `passkey=False` (MQAR points only); the calibration knobs
`attention_steps=`, `attention_lr=`, `attention_heads=`, `attention_conv=yes|no`,
`attention_rope=` (a rope_type) change the control.
"""

from lcjax.config import apply_overrides, parse_arg
from lcjax.models import mamba2_config
from lcjax.models.config import llama_config
from lcjax.train.config import base_config

MITIGATIONS = ("m1_forget_more", "m1_remember_less", "m2_state_norm", "m3_window")


def _study(arg) -> dict:
  """The grid and budgets of `arg` (plain values, shared by get_config, sweep and plots)."""
  study = dict(
    d_states=(4, 8, 16, 32, 64),
    model=dict(d_model=64, num_layers=2, head_dim=16),
    attention_mlp_dim=128,  # the control's MLP: the Mamba-2 block's expand·d_model
    # Measured (runlocal data, 1500 steps at 3e-3): this control reaches 100% at every K; with
    # 4 heads of 16, 97% at K=16; without the convolution (2 attention layers, RoPE), 5-12%;
    # at lr 1e-2 (600 steps) it never leaves the loss plateau (3%).
    attention_heads=1,  # Zoology: num_heads=1
    attention_conv=True,  # the first layer a Mamba-2 mixer (Zoology's short conv), else attention
    attention_conv_d_state=4,  # the control's Mamba-2 layer (its short convolution)
    attention_rope="nope",  # Zoology: max_position_embeddings=0
    attention_steps=0,  # 0: mqar_steps
    attention_lr=3e-3,  # 0: lr
    # MQAR (notes/studies.md §4): 64 keys, 64 values, K ~ U[1, 16], 16 queries, batch 64,
    # AdamW 3e-3 cosine; rows are 2·16 + 1 + 2·16 = 65 tokens, i.e. 64 inputs.
    mqar_steps=1500,
    mqar_batch_size=64,
    mqar_seq_len=64,
    mqar_max_pairs=16,
    mqar_num_queries=16,
    mqar_pairs=(2, 4, 8, 16, 32, 64),
    mqar_rows=128,  # evaluation examples per K (x 16 queried values)
    mqar_threshold=0.8,  # capacity = the largest K with >= 80% value accuracy
    # AdamW, cosine to 0. studies.md's 3e-3 left N=64 at 24% (K=2) after 600 steps here;
    # 1e-2 reached 98.7% (2e-2: 66%), measured on the runlocal budget.
    lr=1e-2,
    warmup_fraction=0.05,
    # Token passkey: T = passkey_length; example length T/4 -> T over the first half.
    passkey=True,
    passkey_steps=1000,
    passkey_batch_size=16,
    passkey_length=256,
    curriculum_fraction=0.5,
    key_digits=3,
    min_key_digits=2,
    passkey_multipliers=(0.25, 0.5, 1, 2, 4, 8, 16),
    depths=(0.1, 0.3, 0.5, 0.7, 0.9),
    trials=8,
    stats_per_train_length=8,  # state-norm samples per T tokens
    stats_multiplier=16,  # state norms over a prompt of 16·T tokens
    m1_decay_scale=2.0,  # M1 "forget more" (Chen et al. 2024 §5.1)
    m1_input_scale=0.5,  # M1 "remember less"
    # M2 (§5.2): a fixed cap on each head's ‖h‖; the runlocal passkey_N64 model's largest head
    # norm is 113 within its training length and 233-3855 beyond (measured), so 128 binds past T.
    m2_state_norm_max=128.0,
    m4_steps=500,  # M4: continual training at 2T (§5.4); the full grid only
    log_every=100,
    eval_batches=2,  # validation batches of answer loss (eval/loss) every log_every steps
  )
  if arg.runlocal:  # 2 CPU cores, ≤ 20 minutes
    study.update(
      d_states=(4, 16, 64),
      mqar_steps=600,
      attention_steps=1500,
      passkey_steps=300,
      passkey_length=128,
      trials=4,
      m4_steps=0,
    )
  if arg.smoke:  # the fast test: a handful of steps, every output produced
    study.update(
      d_states=(4,),
      model=dict(d_model=32, num_layers=1, head_dim=16),
      attention_mlp_dim=64,
      mqar_steps=3,
      mqar_batch_size=8,  # 8 rows also split over 8 devices (a TPU v2-8 Colab, the tests)
      mqar_seq_len=24,
      mqar_max_pairs=4,
      mqar_num_queries=6,
      mqar_pairs=(2, 4),
      mqar_rows=4,
      passkey_steps=3,
      passkey_batch_size=8,
      passkey_length=32,
      passkey_multipliers=(0.5, 1, 2),
      depths=(0.5,),
      trials=2,
      stats_per_train_length=4,
      stats_multiplier=2,
      m4_steps=0,
      log_every=2,
      eval_batches=1,
    )
  if arg.steps:
    study["mqar_steps"] = arg.steps
  if arg.passkey_steps:
    study["passkey_steps"] = arg.passkey_steps
  if arg.lr:
    study["lr"] = arg.lr
  if arg.attention_steps:
    study["attention_steps"] = arg.attention_steps
  if arg.attention_lr:
    study["attention_lr"] = arg.attention_lr
  if arg.attention_rope:
    study["attention_rope"] = arg.attention_rope
  if arg.attention_heads:
    study["attention_heads"] = arg.attention_heads
  if arg.attention_conv in ("yes", "no"):
    study["attention_conv"] = arg.attention_conv == "yes"
  study["passkey"] = study["passkey"] and arg.passkey
  return study


def _arg(arg):
  return parse_arg(
    arg,
    runlocal=False,
    smoke=False,
    steps=0,
    passkey_steps=0,
    passkey=True,
    lr=0.0,
    attention_steps=0,
    attention_lr=0.0,
    attention_rope="",
    attention_heads=0,
    attention_conv="",
  )


def _mamba2(study: dict, N: int):
  """The Mamba-2 model of state size N (8 heads of 16 channels at d_model 64)."""
  return mamba2_config(
    vocab_size=384, expand=2, d_state=N, chunk_size=64, dtype="float32", **study["model"]
  )


def _attention(study: dict) -> dict:
  """The attention control of equal width, Zoology's attention baseline in lcjax's layers.

  Zoology's attention model (HazyResearch/zoology `zoology/experiments/models_repo.py`,
  `add_attention`) is 2 layers of `Hybrid([BaseConv(kernel_size=3), MHA])` with no position
  embeddings: the short convolution shifts each key into its value's position, attention
  matches it. lcjax's short causal convolution is the Mamba-2 mixer's (d_conv = 4), so the
  control's first layer is a Mamba-2 mixer with `attention_conv_d_state` (4: a state that
  alone recalls almost nothing, see mqar_N4) and its second is full attention with NoPE
  (`rope_type="nope"`), `attention_heads` heads (Zoology: 1), each layer with an MLP of
  `attention_mlp_dim`. Its memory is the KV cache, which grows with the context.
  `attention_conv=False` gives two attention layers instead (RoPE by `attention_rope`).
  """
  m = study["model"]
  heads = study["attention_heads"]
  hybrid = dict(
    layer_types=("mamba2", "full_attention"),
    mamba=dict(
      d_state=study["attention_conv_d_state"], head_dim=m["head_dim"], expand=2, chunk_size=64
    ),
  )
  return llama_config(
    vocab_size=384,
    d_model=m["d_model"],
    num_layers=2,
    **(hybrid if study["attention_conv"] else {}),
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=m["d_model"] // heads,
    mlp_dim=study["attention_mlp_dim"],
    rope=dict(rope_type="nope")
    if study["attention_rope"] == "nope"
    else dict(rope_type=study["attention_rope"], rope_theta=10000.0),
    dtype="float32",
  ).to_dict()


def _train(steps: int, batch_size: int, study: dict) -> dict:
  return {
    "train.steps": steps,
    "train.batch_size": batch_size,
    "train.warmup_steps": max(1, round(study["warmup_fraction"] * steps)),
    "checkpoint.every_steps": steps,
  }


def _mqar_point(study: dict, model: dict) -> dict:
  """Overrides of an MQAR training point: `model` (dotted model fields, or the whole model)."""
  T = study["mqar_seq_len"]
  return {
    **model,
    "data.seq_len": T,
    "train.loss_chunk": T,
    **_train(study["mqar_steps"], study["mqar_batch_size"], study),
  }


def _passkey_point(study: dict) -> dict:
  """Overrides of a token-passkey training point (its model: the MQAR point it starts from)."""
  T = study["passkey_length"]
  steps, batch = study["passkey_steps"], study["passkey_batch_size"]
  shortest = 2 * study["key_digits"] + 2  # the needle alone
  lengths = sorted({max(round(m * T), shortest) for m in study["passkey_multipliers"]})
  return {
    "data.seq_len": T,
    "train.loss_chunk": T,
    **_train(steps, batch, study),
    "data.synthetic.task": "token_passkey",
    "data.synthetic.max_pairs": None,
    "data.synthetic.num_queries": None,
    "data.synthetic.key_digits": study["key_digits"],
    "data.synthetic.min_key_digits": study["min_key_digits"],
    "data.synthetic.curriculum_rows": round(study["curriculum_fraction"] * steps * batch),
    "eval.mqar.enabled": False,
    "eval.token_passkey.enabled": True,
    "eval.token_passkey.lengths": tuple(lengths),
    "eval.state_norms.enabled": True,
    "eval.state_norms.length": study["stats_multiplier"] * T,
    "eval.state_norms.every": max(1, T // study["stats_per_train_length"]),
  }


def get_config(arg=None):
  arg = _arg(arg)
  study = _study(arg)
  c = base_config()
  c.model = _mamba2(study, study["d_states"][-1])  # each point sets its own d_state
  c.data.synthetic.update(
    task="mqar", max_pairs=study["mqar_max_pairs"], num_queries=study["mqar_num_queries"]
  )
  c.train.update(
    lr=study["lr"],
    schedule="cosine",
    min_lr_ratio=0.0,
    b2=0.999,
    weight_decay=0.01,
    grad_clip_norm=1.0,
    log_every=study["log_every"],
  )
  c.checkpoint.update(keep=1, async_save=False)
  c.eval.update(every_steps=study["log_every"], batches=study["eval_batches"])
  c.eval.mqar.update(
    enabled=True,
    pairs=study["mqar_pairs"],
    rows=study["mqar_rows"],
    threshold=study["mqar_threshold"],
  )
  c.eval.token_passkey.update(depths=study["depths"], trials=study["trials"])
  apply_overrides(c, _mqar_point(study, {}))
  return c


def _mitigations(study: dict) -> dict[str, dict]:
  """Eval-only overrides of M1-M3 (Chen et al. 2024 §5.1-5.3) on the largest-N passkey model."""
  return {
    "m1_forget_more": {"model_overrides.decay_scale": study["m1_decay_scale"]},
    "m1_remember_less": {"model_overrides.input_scale": study["m1_input_scale"]},
    "m2_state_norm": {"model_overrides.state_norm_max": study["m2_state_norm_max"]},
    "m3_window": {"model_overrides.state_window": study["passkey_length"]},
  }


def sweep(add, arg=None):
  study = _study(_arg(arg))
  for N in study["d_states"]:
    add(f"mqar_N{N}", **_mqar_point(study, {"model.d_state": N}))
  attention = _mqar_point(study, {"model": _attention(study)})
  if study["attention_steps"]:
    attention.update(_train(study["attention_steps"], study["mqar_batch_size"], study))
  if study["attention_lr"]:
    attention["train.lr"] = study["attention_lr"]
  add("mqar_attention", **attention)
  if not study["passkey"]:
    return
  for N in study["d_states"]:
    # model.d_state only says what the checkpoint holds (init_from's model is used as is).
    add(f"passkey_N{N}", after=f"mqar_N{N}", **{"model.d_state": N, **_passkey_point(study)})
  N = study["d_states"][-1]
  after, base = f"passkey_N{N}", {"model.d_state": N, **_passkey_point(study)}
  for name, overrides in _mitigations(study).items():
    add(f"{after}_{name}", after=after, eval_only=True, **base, **overrides)
  if study["m4_steps"]:  # M4 (§5.4): continual training on 2T-token rows
    T = study["passkey_length"]
    m4 = {
      **base,
      "data.seq_len": 2 * T,
      "train.loss_chunk": 2 * T,
      "data.synthetic.curriculum_rows": 0,
      **_train(study["m4_steps"], study["passkey_batch_size"], study),
    }
    add(f"{after}_m4_train{2 * T}", after=after, **m4)


def metrics(arg=None):
  del arg
  return [
    "eval/d_state",
    "eval/mqar@*",
    "eval/mqar_capacity",
    "eval/token_passkey@*",
    "eval/token_passkey_max_length",
    "eval/state_norm_max@*",
    "eval/state_abs_max",
    "eval/loss",
    "eval/mqar_capacity_vs_d_state@*",
    "eval/token_passkey_max_length_vs_d_state@*",
  ]


def plots(arg=None):
  study = _study(_arg(arg))
  mqar = [f"mqar_N{n}" for n in study["d_states"]] + ["mqar_attention"]
  N = study["d_states"][-1]
  trained = [f"passkey_N{n}" for n in study["d_states"]]
  passkey = trained + [f"passkey_N{N}_{m}" for m in MITIGATIONS]
  out = [
    dict(
      file="mqar_accuracy_vs_pairs.png",
      metric="eval/mqar@{x}",
      points=mqar,
      title="MQAR value accuracy vs. key-value pairs",
      xlabel="key-value pairs K",
      ylabel="value accuracy",
    ),
    dict(
      file="mqar_capacity_vs_d_state.png",
      metric="eval/mqar_capacity_vs_d_state@{x}",
      points=mqar,
      title=f"MQAR capacity (largest K at >= {study['mqar_threshold']:.0%}) vs. state size",
      xlabel="d_state N",
      ylabel="capacity K",
    ),
  ]
  if study["passkey"]:
    out += [
      dict(
        file="token_passkey_vs_length.png",
        metric="eval/token_passkey@{x}",
        points=passkey,
        title=f"token passkey accuracy, trained at {study['passkey_length']} tokens",
        xlabel="context length (tokens)",
        ylabel="passkey accuracy",
      ),
      dict(
        file="token_passkey_max_length_vs_d_state.png",
        metric="eval/token_passkey_max_length_vs_d_state@{x}",
        points=trained,
        title="longest length with >= 90% passkey accuracy vs. state size",
        xlabel="d_state N",
        ylabel="max length (tokens)",
      ),
      dict(
        file="state_norm_vs_position.png",
        metric="eval/state_norm_max@{x}",
        points=passkey,
        title=f"largest head state norm, trained at {study['passkey_length']} tokens",
        xlabel="position (tokens)",
        ylabel="max ‖h‖ over layers and heads",
        logy=True,
      ),
    ]
  return out
