"""AnchorAttention's bf16 RoPE breakdown, at the kernel and the model level (a sweep).

  python scripts/sweep.py --config configs/bf16_rope.py --workdir runs/bf16_rope
  python scripts/sweep.py --config configs/bf16_rope.py:checkpoint=runs/quickstart \
      --workdir runs/bf16_rope_qs        # measure an existing quickstart run instead
  python scripts/sweep.py --config configs/bf16_rope.py:smoke --workdir /tmp/bf16

Reproduces at small scale Wang et al. 2024, "When Precision Meets Position: BFloat16 Breaks
Down RoPE in Long-Context Training" (arXiv:2411.13476, TMLR 2025), §2: in bf16, RoPE
attention stops depending on relative position alone; the paper finds the deviation grows
with context length, mostly through the first token, and AnchorAttention (a shared anchor
token at position 0; haonan3/AnchorContext) as the remedy. `lcjax.eval.precision` holds the
measurements; the protocol and calibration are notes/studies.md §5.

Points: `pretrain` trains the quickstart (configs/quickstart.py: a 4-layer d128 byte Llama,
256-token rows, 600 steps) without its perplexity evaluation; `bf16_rope` (eval only, after
it) runs `eval.bf16_rope`: (a) kernel level, random q, k (head_dim 128) shifted by Δ up to
2^19: mean |Δlogit| and the L1 change of softmax rows over 1K/8K/32K keys with and without a
sink key, for fp32 (lcjax: exact angles), fp32 with HF's angles (one rounded fp32 product),
HF-style bf16 and lcjax's bf16 path; (b) model
level, the checkpoint on the first 4,096 tokens of a held-out file with positions
arange(T) + Δ: per layer and context, the L1 change of attention rows from Δ = 0 in fp32 and
bf16, with and without the first column, with global positions and with the first (anchor)
token held at position 0, and the file's perplexity in 256-token windows under shifts up to
2^22; (c) the angle rounding of HF's fp32 product and of lcjax's `rope_cos_sin`. With
`checkpoint=DIR` the sweep measures that run folder's newest checkpoint instead (one point).

Outputs (WORKDIR): bf16_rope/eval/bf16_rope.json (every number), plots/bf16_rope_shift.png,
the tables printed, results.csv / results.md (the model's L1 per Δ and the kernel logits).
Expect (README.md, "The bf16 RoPE study", has the measured tables): kernel fp32 mean
|Δlogit| 1.1e-7-1.4e-7 up to Δ=2^19 (with HF's angles 9.8e-5 at 16K, 3.7e-4 at 65K); bf16
2.6e-3 (lcjax) / 4.3e-3 (HF) from Δ=1 on; model bf16 row L1 ~1e-2, ~8,000x fp32; perplexity
flat with exact angles, ~3e-4 off at Δ=2^22 with HF's (1.3e-3 at an earlier commit's
checkpoint). 3 min 2 s on an idle 2-core machine (the 600-step pretrain 2 min 26 s).
Args: `smoke` (a 2-layer model, 3 steps, tiny sizes: every output in seconds),
`checkpoint=DIR`, `steps=`.
"""

import os

from lcjax.config import load_config, parse_arg


def _arg(arg):
  return parse_arg(arg, smoke=False, checkpoint="", steps=0)


def _study(arg) -> dict:
  """The `eval.bf16_rope` settings (lcjax.eval.precision.bf16_rope_evaluation)."""
  study = dict(
    enabled=False,
    kernel=dict(
      head_dim=128,
      rope_theta=10000.0,
      logit_deltas=(1, 16, 256, 4096, 16384, 65536, 262144, 524288),
      logit_pairs=4096,
      max_distance=2048,
      lengths=(1024, 8192, 32768),
      softmax_deltas=(1, 4096, 65536),
      rows=32,
      sink_logit=12.0,
      seed=0,
    ),
    angle_starts=(4096, 65536, 262144, 524288),
    length=4096,  # tokens of the held-out file
    deltas=(1, 256, 4096, 65536),
    contexts=(256, 512, 1024, 2048, 4096),
    rows_per_context=32,
    schemes=("global", "anchor"),
    variants=("fp32", "bf16", "fp32_hf_angles"),
    # Perplexity of the same file in 256-token windows (the quickstart's rows) at
    # positions shifted by Δ: does the angle arithmetic change the loss? (lcjax.eval.precision)
    perplexity=dict(window=256, deltas=(4096, 65536, 524288, 1048576, 4194304)),
    block=512,  # blockwise attention blocks of the measured forward (CPU compile time)
    summary_delta=4096,
    plot="plots/bf16_rope_shift.png",  # relative to the point's run folder
  )
  if arg.smoke:
    study["kernel"].update(
      head_dim=32,
      logit_deltas=(1, 4096, 65536),
      logit_pairs=256,
      max_distance=256,
      lengths=(64, 1024),
      softmax_deltas=(4096,),
      rows=8,
    )
    study.update(
      angle_starts=(4096, 524288),
      length=128,
      deltas=(16, 4096),
      contexts=(32, 64, 128),
      rows_per_context=8,
      block=128,
      perplexity=dict(window=32, deltas=(524288,)),
    )
  return study


def get_config(arg=None):
  arg = _arg(arg)
  c = load_config("configs/quickstart.py" + (":tiny" if arg.smoke else ""), lock=False)
  if arg.smoke:
    c.train.update(steps=3, warmup_steps=1, log_every=1)
    c.checkpoint.every_steps = 3
  if arg.steps:
    c.train.steps = arg.steps
  # The study measures the checkpoint; the quickstart's perplexity table is not part of it.
  c.eval.update(every_steps=0, ppl_lengths=(), rope_variants={})
  c.eval.bf16_rope = _study(arg)
  return c


def sweep(add, arg=None):
  arg = _arg(arg)
  measure = {
    "eval.bf16_rope.enabled": True,
    # The point's folder is WORKDIR/bf16_rope: the figure goes to WORKDIR/plots.
    "eval.bf16_rope.plot": os.path.join("..", "plots", "bf16_rope_shift.png"),
  }
  if arg.checkpoint:
    add("bf16_rope", eval_only=True, init_from=os.path.abspath(arg.checkpoint), **measure)
    return
  add("pretrain")
  add("bf16_rope", after="pretrain", eval_only=True, **measure)


def metrics(arg=None):
  del arg
  # Every number is in bf16_rope/eval/bf16_rope.json.
  return ["eval/bf16_rope/model_*_l1@*", "eval/bf16_rope/ppl_*"]
