"""State capacity and state collapse of tiny Mamba-2 models on passkey retrieval.

Reproduces at small scale Chen et al. 2024, "Stuffed Mamba: State Collapse and State
Capacity of RNN-Based Long-Context Modeling" (arXiv:2410.07145): §6, the longest
context at which a 5-digit passkey is retrieved grows with the state size N
(exponentially in the paper); §4, past the training length the state "collapses"
(a few channels explode); §5, the training-free mitigations M1–M3
(`lcjax.ssm.mitigations`, model knobs decay_scale / input_scale, state_norm_max,
state_window). M4, continual training on longer sequences, is `train_lengths`.
The SSD layer is Dao & Gu 2024, "Transformers are SSMs".

This is a grid study, not one training run, so it has its own runner
(`lcjax.eval.state_capacity.run_state_capacity_study`), not scripts/train.py:

  python configs/mamba2_state_capacity.py --arg runlocal --workdir runs/state_capacity
  python configs/mamba2_state_capacity.py --workdir runs/state_capacity_full      # full grid
  python configs/mamba2_state_capacity.py --arg smoke --workdir /tmp/sc          # seconds

For each (train length T, d_state N): a 2-layer Mamba-2 is trained on passkey rows
(the `lcjax.eval.passkey` prompt format + " " + the key; loss on the 5 answer digits
only; needle depth uniform), then evaluated with `passkey_accuracy` at
`eval_multipliers` × T (lengths below the shortest possible prompt, 248 bytes, are
dropped) and its per-layer state norms are recorded over a 16×T prompt. The
largest-N model of each T is re-run with each mitigation (state norms; passkey
accuracy for M1 and M2, whose recurrent form `generate` supports).

Outputs: a printed table, WORKDIR/eval/state_capacity.json, and
WORKDIR/plots/state_capacity_{accuracy,max_length,state_norms}.png.
"""

import ml_collections

from lcjax.config import parse_arg
from lcjax.models import mamba2_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, smoke=False, steps=0)
  model = mamba2_config(
    vocab_size=384,  # the byte tokenizer
    d_model=64,
    num_layers=2,
    head_dim=16,  # 8 heads of 16 channels, each with an N-dim state
    expand=2,
    d_state=16,  # replaced by each grid point
    chunk_size=64,
    dtype="float32",
  )
  study = ml_collections.ConfigDict(
    dict(
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
      seed=0,
      log_every=200,
      stats_per_train_length=8,  # state-norm samples per T tokens
      m1_decay_scale=2.0,  # M1 "forget more" (Chen et al. 2024 §5.1)
      m1_input_scale=0.5,  # M1 "remember less"
      mitigation_accuracy=True,
      plots=True,
    )
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
      mitigation_accuracy=False,
    )
  if arg.smoke:  # the fast test: a handful of steps, every output produced
    model.update(d_model=32, head_dim=16, num_layers=1)
    study.update(
      d_states=(2, 4),
      train_lengths=(256,),
      eval_multipliers=(0.5, 1),
      depths=(0.5,),
      trials=1,
      steps=2,
      batch_size=2,
      warmup_steps=1,
      log_every=0,
      stats_per_train_length=4,
      mitigation_accuracy=False,
    )
  if arg.steps:
    study.steps = arg.steps
  return ml_collections.ConfigDict(dict(model=model, study=study))


if __name__ == "__main__":
  import argparse

  from lcjax.eval.state_capacity import run_state_capacity_study

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arg", default="", help="config arg, e.g. runlocal or smoke,steps=5")
  parser.add_argument("--workdir", required=True)
  flags = parser.parse_args()
  run_state_capacity_study(get_config(flags.arg), flags.workdir)
