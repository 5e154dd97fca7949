"""Long-context evaluations: strided perplexity vs. length, passkey retrieval, plots.

Results go to `WORKDIR/eval/*.json` (`write_json`) and figures to
`WORKDIR/plots/*.png` (`plot_ppl_vs_length`, `plot_passkey_heatmap`).
"""

from lcjax.eval.io import write_json
from lcjax.eval.passkey import make_passkey_prompt, passkey_accuracy
from lcjax.eval.perplexity import perplexity, perplexity_vs_length
from lcjax.eval.plots import plot_passkey_heatmap, plot_ppl_vs_length

__all__ = [
  "perplexity",
  "perplexity_vs_length",
  "make_passkey_prompt",
  "passkey_accuracy",
  "plot_ppl_vs_length",
  "plot_passkey_heatmap",
  "write_json",
]
