"""The bf16 RoPE study's report: acceptance checks, printed tables and the figure.

Reads the summary dict `lcjax.eval.precision.bf16_rope_evaluation` builds (kernel level,
model level, angle rounding) and states the AnchorAttention §2 claims (Wang et al. 2024,
arXiv:2411.13476) as ratios; README "The bf16 RoPE study" quotes these tables.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lcjax.eval.plots import _save

__all__ = ["acceptance_checks", "at_delta", "format_tables", "plot_bf16_rope"]


def at_delta(values: Sequence, keys: Sequence, key) -> Any:
  """values[i] where keys[i] == key, else the last value (the largest setting)."""
  keys = list(keys)
  return values[keys.index(key)] if key in keys else values[-1]


def _used(deltas: Sequence[int], delta: int) -> int:
  """The shift the by-length tables report: `delta` when measured, else the largest."""
  return at_delta(deltas, deltas, delta)


def acceptance_checks(summary: dict) -> dict[str, Any]:
  """The study's claims as numbers (notes/studies.md §5 and issue #12).

  fp32_max_logit_upto_65536: the kernel-level fp32 mean |Δlogit| at its worst Δ <= 65,536
  (claim: < 1e-4), also with HF's angles; bf16_over_fp32: the model-level bf16 / fp32 L1
  ratio at each Δ (longest context, mean over layers; claim: >= 10); bf16_growth_with_context:
  model bf16 L1 at the longest over the shortest context, all columns, without the first, and
  the bf16 - fp32 gap at the same Δ (claims: > 1 with the first column, flat without it; under
  `anchor` the gap is the precision part, as the fp32 rows change too: the anchor's distance
  to every query changes); kernel_growth_with_length: the same ratio over L for the kernel
  softmax rows of lcjax_bf16 with and without a sink; ppl_change_<variant>: the largest
  |ppl(Δ) / ppl(0) - 1| of `shift_perplexity` over its shifts.
  """
  kernel, model = summary["kernel"], summary.get("model")
  checks: dict[str, Any] = {}
  deltas = kernel["logit_deltas"]
  upto = [i for i, d in enumerate(deltas) if 0 < d <= 65536]
  for path in ("fp32", "fp32_hf_angles"):
    if path in kernel["logit"] and upto:
      checks[f"{path}_max_logit_upto_65536"] = max(kernel["logit"][path][i] for i in upto)
  soft = kernel["softmax"]
  sd = summary["summary_delta"]
  for kind in ("sink", "nosink"):
    if "lcjax_bf16" in soft[kind]:
      per_length = [
        at_delta(row, kernel["softmax_deltas"], sd) for row in soft[kind]["lcjax_bf16"]["l1"]
      ]
      checks[f"kernel_growth_with_length_{kind}"] = per_length[-1] / per_length[0]
  if model is not None:
    res = model["results"]
    if "global/bf16" in res and "global/fp32" in res:
      bf16 = [np.mean([layer[-1] for layer in d]) for d in res["global/bf16"]["l1"]]
      fp32 = [np.mean([layer[-1] for layer in d]) for d in res["global/fp32"]["l1"]]
      checks["bf16_over_fp32"] = {
        str(d): float(b / f) for d, b, f in zip(model["deltas"], bf16, fp32, strict=True)
      }
    for scheme in ("global", "anchor"):
      if f"{scheme}/bf16" in res:
        entry = res[f"{scheme}/bf16"]
        for key in ("l1", "l1_nofirst", "l1_vs_fp32"):
          if key in entry:
            per_ctx = np.mean(at_delta(entry[key], model["deltas"], sd), axis=0)
            checks[f"bf16_growth_with_context_{scheme}_{key}"] = float(per_ctx[-1] / per_ctx[0])
  ppl = summary.get("perplexity")
  if ppl is not None:
    for variant, values in ppl["ppl"].items():
      checks[f"ppl_change_{variant}"] = max(abs(v / values[0] - 1.0) for v in values)
  return checks


def _row(name: str, values: Sequence[float], width: int = 11) -> str:
  return f"{name:<34}" + "".join(f"{v:>{width}.2e}" for v in values)


def _head(name: str, labels: Sequence, width: int = 11) -> str:
  line = f"{name:<34}" + "".join(f"{str(x):>{width}}" for x in labels)
  return line + "\n" + "-" * len(line)


def format_tables(summary: dict) -> str:
  """The study's tables as text (what `bf16_rope_evaluation` prints)."""
  kernel, sd = summary["kernel"], summary["summary_delta"]
  out = [
    f"kernel: mean |Δlogit| under a shift Δ (head_dim {kernel['head_dim']}, "
    f"{kernel['logit_pairs']} pairs, distances < {kernel['max_distance']})",
    _head("rotation \\ Δ", kernel["logit_deltas"]),
  ]
  out += [_row(p, v) for p, v in kernel["logit"].items()]
  out += [
    "",
    f"kernel: L1 change of softmax rows at Δ={_used(kernel['softmax_deltas'], sd)}"
    f" over L keys ({kernel['rows']} rows; sink logit {kernel['sink_logit']:g})",
    _head("rotation \\ L", kernel["lengths"]),
  ]
  for kind in ("sink", "nosink"):
    for path, entry in kernel["softmax"][kind].items():
      out.append(
        _row(f"{path} {kind}", [at_delta(r, kernel["softmax_deltas"], sd) for r in entry["l1"]])
      )
      if kind == "sink":
        nofirst = [at_delta(r, kernel["softmax_deltas"], sd) for r in entry["l1_nofirst"]]
        out.append(_row(f"{path} sink, keys>=1", nofirst))
  out.append(_row("sink mass p_0", kernel["sink_mass"]))
  angles = summary["angles"]
  out += ["", "fp32 RoPE angles: largest error (rad) at positions [start, start + span)"]
  out.append(_head("start", ("HF product", "HF tables", "lcjax", "inv_freq"), 12))
  keys = ("product_rounding", "hf_table_error", "table_error", "inv_freq_rounding")
  for i, start in enumerate(angles["starts"]):
    out.append(_row(str(start), [angles[k][i] for k in keys], 12))
  ppl = summary.get("perplexity")
  if ppl is not None:
    out += [
      "",
      f"perplexity of the file at positions shifted by Δ ({ppl['windows']} windows of "
      f"{ppl['window']} tokens): ppl(Δ) / ppl(0) - 1",
      _head("variant \\ Δ", ["ppl(0)", *ppl["deltas"][1:]]),
    ]
    for variant, values in ppl["ppl"].items():
      out.append(_row(variant, [values[0], *(v / values[0] - 1.0 for v in values[1:])]))
  model = summary.get("model")
  if model is not None:
    res, contexts = model["results"], model["contexts"]
    out += [
      "",
      f"model: L1 change of attention rows from Δ=0 (mean over {model['layers']} layers; rows "
      f"near {contexts[-1]} tokens; file {model.get('file', '?')})",
      _head("scheme/variant \\ Δ", model["deltas"]),
    ]
    for name, entry in res.items():
      for key, tag in (("l1", ""), ("l1_nofirst", " -col0")):
        out.append(_row(name + tag, [np.mean([layer[-1] for layer in d]) for d in entry[key]]))
      if "l1_vs_fp32" in entry:
        gap = [np.mean([layer[-1] for layer in d]) for d in entry["l1_vs_fp32"]]
        out.append(_row(name + " vs fp32", gap))
    d = _used(model["deltas"], sd)
    out += ["", f"model: L1 change at Δ={d} by context (mean over layers)"]
    out.append(_head("scheme/variant \\ context", contexts))
    for name, entry in res.items():
      for key, tag in (("l1", ""), ("l1_nofirst", " -col0")):
        out.append(_row(name + tag, np.mean(at_delta(entry[key], model["deltas"], sd), axis=0)))
      if "l1_vs_fp32" in entry:
        gap = np.mean(at_delta(entry["l1_vs_fp32"], model["deltas"], sd), axis=0)
        out.append(_row(name + " vs fp32", gap))
    out += ["", f"model: per layer at Δ={d}, rows near {contexts[-1]} tokens"]
    out.append(_head("scheme/variant \\ layer", range(model["layers"])))
    for name, entry in res.items():
      out.append(_row(name, [layer[-1] for layer in at_delta(entry["l1"], model["deltas"], sd)]))
      out.append(_row(name + " col0 mass", [layer[-1] for layer in entry["first_mass"]]))
  checks = summary.get("checks", {})
  if checks:
    out += ["", "checks: " + ", ".join(f"{k}={_fmt(v)}" for k, v in checks.items())]
  return "\n".join(out)


def _fmt(value: Any) -> str:
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
  return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_bf16_rope(summary: dict, path: str | os.PathLike) -> str:
  """Four panels: kernel |Δlogit| vs Δ; kernel softmax L1 vs L; model L1 vs Δ; vs context."""
  from matplotlib.figure import Figure  # noqa: PLC0415

  kernel, model, sd = summary["kernel"], summary.get("model"), summary["summary_delta"]
  fig = Figure(figsize=(12, 9) if model else (12, 4.5), layout="constrained")
  panels = [fig.add_subplot(2 if model else 1, 2, i + 1) for i in range(4 if model else 2)]
  colors = dict(fp32="C0", fp32_hf_angles="C2", hf_bf16="C3", lcjax_bf16="C1", bf16="C1")
  ax = panels[0]
  x = [d for d in kernel["logit_deltas"] if d > 0]
  for p, values in kernel["logit"].items():
    y = [v for d, v in zip(kernel["logit_deltas"], values, strict=True) if d > 0]
    ax.plot(x, y, marker="o", color=colors.get(p), label=p)
  ax.set(xscale="log", yscale="log", xlabel="shift Δ", ylabel="mean |Δlogit|")
  ax.set_title(f"kernel: random q, k (d={kernel['head_dim']})")
  ax = panels[1]
  for kind, style in (("sink", "-"), ("nosink", "--")):
    for p, entry in kernel["softmax"][kind].items():
      y = [at_delta(r, kernel["softmax_deltas"], sd) for r in entry["l1"]]
      ax.plot(kernel["lengths"], y, style, marker="o", color=colors.get(p), label=f"{p} {kind}")
  ax.set(xscale="log", yscale="log", xlabel="keys L", ylabel="L1 change of softmax row")
  ax.set_xticks(kernel["lengths"], [str(n) for n in kernel["lengths"]])
  ax.set_title(f"kernel: softmax rows, Δ={_used(kernel['softmax_deltas'], sd)} (-- no sink)")
  if model:
    res = model["results"]
    ax = panels[2]
    for name, entry in res.items():
      variant = name.split("/")[1]
      style = "-" if name.startswith("global") else ":"
      y = [np.mean([layer[-1] for layer in d]) for d in entry["l1"]]
      ax.plot(model["deltas"], y, style, marker="o", color=colors.get(variant), label=name)
      if variant == "bf16":
        y = [np.mean([layer[-1] for layer in d]) for d in entry["l1_nofirst"]]
        ax.plot(model["deltas"], y, style, marker="x", color="C4", label=name + " w/o col 0")
    ax.set(xscale="log", yscale="log", xlabel="shift Δ", ylabel="L1 change of attention row")
    ax.set_title(f"model: rows near {model['contexts'][-1]} tokens, mean over layers")
    ax = panels[3]
    for name, entry in res.items():
      variant = name.split("/")[1]
      style = "-" if name.startswith("global") else ":"
      for key, marker in (("l1", "o"), ("l1_nofirst", "x")):
        y = np.mean(at_delta(entry[key], model["deltas"], sd), axis=0)
        label = name + ("" if key == "l1" else " w/o col 0")
        ax.plot(model["contexts"], y, style, marker=marker, color=colors.get(variant), label=label)
      if "l1_vs_fp32" in entry:
        y = np.mean(at_delta(entry["l1_vs_fp32"], model["deltas"], sd), axis=0)
        ax.plot(model["contexts"], y, style, marker="s", color="k", label=f"{name} vs fp32")
    ax.set(xscale="log", yscale="log", xlabel="context (query position)", ylabel="L1 change")
    ax.set_xticks(model["contexts"], [str(c) for c in model["contexts"]])
    ax.minorticks_off()
    ax.set_title(f"model: Δ={_used(model['deltas'], sd)} by context")
  for ax in panels:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("bf16 RoPE breakdown (Wang et al. 2024, arXiv:2411.13476 §2)")
  return _save(fig, path)
