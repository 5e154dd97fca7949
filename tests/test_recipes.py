"""Continual-pretraining recipe configs (configs/recipes/): published numbers and validity.

Each recipe's docstring holds a table of the paper's numbers (one row per stage); the
config must encode exactly those, at full size, and every stage must validate on the pod
mesh it names. The CPU sizes must keep the recipe's shape (lengths, θ ordering, token
ratios).
"""

import math
import re

import pytest

from lcjax.config import load_config, load_module
from lcjax.recipes import scaled_rope_theta, steps_in_ratio
from lcjax.sweep.stages import stage_configs, stages_spec
from lcjax.train.config import validate_config

RECIPES = ["configs/recipes/lwm.py"]


def _docstring_rows(path: str) -> list[dict[str, str]]:
  """The markdown table of a config's docstring as dicts keyed by its header."""
  lines = [line.strip() for line in load_module(path).__doc__.splitlines()]
  table = [line for line in lines if line.startswith("|") and not set(line) <= set("|-: ")]
  header = [cell.strip() for cell in table[0].strip("|").split("|")]
  return [
    dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))
    for row in table[1:]
  ]


@pytest.mark.parametrize("path", RECIPES)
def test_full_size_encodes_the_published_table(path):
  module = load_module(path)
  rows = _docstring_rows(path)
  stages = stage_configs(load_config(path))
  assert len(rows) == len(stages) == len(module.PUBLISHED)
  for row, (seq_len, theta, tokens), (_, config) in zip(
    rows, module.PUBLISHED, stages, strict=True
  ):
    assert (int(row["seq_len"]), float(row["rope_theta"]), float(row["tokens"])) == (
      seq_len,
      theta,
      tokens,
    )
    assert config.data.seq_len == seq_len
    assert config.model.rope.rope_theta == theta
    assert config.model.max_position_embeddings == seq_len
    # Whole batches: the step count rounds tokens / tokens-per-batch.
    batch_tokens = config.train.batch_size * seq_len
    assert batch_tokens == module.TOKENS_PER_BATCH
    assert abs(config.train.steps * batch_tokens - tokens) <= batch_tokens / 2
    assert config.train.lr == module.LR
    validate_config(config, num_devices=module.POD_CHIPS)


@pytest.mark.parametrize("path", RECIPES)
def test_cpu_size_keeps_the_recipe_shape(path):
  module = load_module(path)
  stages = stage_configs(load_config(f"{path}:runlocal"))
  tokens = [t for _, _, t in module.PUBLISHED]
  steps = [config.train.steps for _, config in stages]
  assert steps == list(steps_in_ratio(tokens, module.CPU_STEPS))
  for (seq_len, theta, _), (_, config) in zip(module.PUBLISHED, stages, strict=True):
    T = config.data.seq_len
    assert T == seq_len // module.CPU_DIVISOR
    assert math.isclose(
      config.model.rope.rope_theta, scaled_rope_theta(theta, seq_len, T), rel_tol=1e-3
    )
    validate_config(config, num_devices=1)  # a laptop CPU
  spec = stages_spec(load_config(f"{path}:runlocal"))
  assert [p.after for p in spec.points] == [None] + [p.name for p in spec.points[:-1]]


def test_scaled_theta_keeps_the_critical_dimension_fraction():
  # Fraction of rotary pairs whose wavelength 2π θ^(2i/d) fits in T: log_θ(T / 2π).
  fraction = lambda theta, T: math.log(T / (2 * math.pi)) / math.log(theta)  # noqa: E731
  for theta, T, small in ((5e7, 2**20, 4096), (1e6, 32768, 128), (1e4, 4096, 64)):
    scaled = scaled_rope_theta(theta, T, small)
    assert math.isclose(fraction(scaled, small), fraction(theta, T), rel_tol=1e-12)
    assert scaled < theta
  with pytest.raises(ValueError, match="lengths > 2π"):
    scaled_rope_theta(1e4, 4, 2)
  assert steps_in_ratio([4.8, 12, 12, 3, 1.8], 150) == (21, 54, 54, 13, 8)
  assert re.search("Tab. 1", load_module("configs/recipes/lwm.py").__doc__)


def test_recipes_load_from_any_working_directory(tmp_path, monkeypatch):
  """`configs/recipes/NAME.py` resolves outside the checkout (Colab), as lcjax.configs.recipes."""
  monkeypatch.chdir(tmp_path)
  for spec in ("configs/recipes/lwm.py:smoke", "recipes/lwm:smoke"):
    assert load_config(spec).stages, spec
