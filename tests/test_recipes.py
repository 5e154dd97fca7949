"""Continual-pretraining recipe configs (configs/recipes/): published numbers and validity.

Each recipe's docstring holds the paper's numbers as markdown tables: one row per stage
(columns named after what they check, see `_STAGE_COLUMNS`), optionally a `setting | value`
table of values every stage shares and a `source name | stage 1 | ...` table of data-mix
fractions. The config must encode exactly those at full size, and every stage must validate
on the pod mesh it names. The CPU sizes must keep the recipe's shape (lengths, θ rescaled,
step ratios, the data mix).
"""

import math
import os
import re
import subprocess
import sys

import pytest

from lcjax.config import ConfigError, load_config, load_module
from lcjax.data import build_source, describe_document
from lcjax.data.sources import DataPathNotFoundError
from lcjax.data.stdlib_corpus import stdlib_root
from lcjax.recipes import cpu_stage, scaled_rope_theta, steps_in_ratio
from lcjax.sweep.points import point_config
from lcjax.sweep.stages import stage_configs, stages_spec
from lcjax.train.config import validate_config

RECIPES = [
  "configs/recipes/lwm.py",
  "configs/recipes/llama2_long.py",
  "configs/recipes/prolong.py",
  "configs/recipes/qwen25_1m.py",
  "configs/recipes/eabf100.py",
]
_NONE = "—"  # a cell that does not apply to the stage


def _tables(path: str) -> list[list[dict[str, str]]]:
  """The markdown tables of a config's docstring, each as dicts keyed by its header."""
  tables, block = [], []
  for line in [*load_module(path).__doc__.splitlines(), ""]:
    line = line.strip()
    if line.startswith("|"):
      if not set(line) <= set("|-: "):
        block.append([cell.strip() for cell in line.strip("|").split("|")])
    elif block:
      header, *rows = block
      tables.append([dict(zip(header, row, strict=True)) for row in rows])
      block = []
  return tables


def _table(path: str, first_column: str) -> list[dict[str, str]]:
  found = [t for t in _tables(path) if t and next(iter(t[0])) == first_column]
  assert len(found) <= 1, f"{path}: two tables start with {first_column!r}"
  return found[0] if found else []


def _value(text: str):
  if text in ("True", "False"):
    return text == "True"
  try:
    return float(text)
  except ValueError:
    return text


def _long_fraction(config):
  mixture = config.data.mixture
  if mixture is None:
    return None
  weights = {entry["name"]: entry["weight"] for entry in mixture}
  return weights["long"] / sum(weights.values())


# What each column of a stage table checks (besides seq_len, rope_theta and tokens).
_STAGE_COLUMNS = {
  "steps": lambda config, carry: config.train.steps,
  "lr": lambda config, carry: config.train.lr,
  "warmup_steps": lambda config, carry: config.train.warmup_steps,
  "schedule": lambda config, carry: config.train.schedule,
  "long_fraction": lambda config, carry: _long_fraction(config),
  "optimizer": lambda config, carry: "carried" if carry else "new",
}


def _setting(config, name: str):
  """A `setting | value` table's field: looked up in train, data, model.rope, then model."""
  for section in (config.train, config.data, config.model.rope, config.model):
    if name in section:
      return section[name]
  raise AssertionError(f"setting {name!r} names no field of train, data or model")


def _check_mixture(path: str, stages: list, full: bool) -> None:
  """The `source name | stage k` table against each stage's data.mixture (by name)."""
  rows = _table(path, "source name")
  for k, (_, config) in enumerate(stages, 1):
    wanted = {
      row["source name"]: float(row[f"stage {k}"]) for row in rows if row[f"stage {k}"] != _NONE
    }
    if not wanted:
      continue
    got = {entry["name"]: entry["weight"] for entry in config.data.mixture}
    assert got == pytest.approx(wanted), f"stage {k}"
    assert math.isclose(sum(got.values()), 1.0)
    for entry in config.data.mixture:  # at full size, every source is a path of its own
      assert (entry["source"]["kind"] != "stdlib") == full


@pytest.mark.parametrize("path", RECIPES)
def test_full_size_encodes_the_published_tables(path):
  module = load_module(path)
  rows = _tables(path)[0]
  config = load_config(path)
  stages = stage_configs(config)
  carried = [
    p.overrides.get("train.carry_optimizer_state", False) for p in stages_spec(config).points
  ]
  assert len(rows) == len(stages) == len(module.PUBLISHED)
  for k, (row, (seq_len, theta, tokens), (_, stage)) in enumerate(
    zip(rows, module.PUBLISHED, stages, strict=True)
  ):
    assert int(row["stage"]) == k + 1
    assert (int(row["seq_len"]), float(row["rope_theta"])) == (seq_len, theta)
    assert stage.data.seq_len == stage.model.max_position_embeddings == seq_len
    assert stage.model.rope.rope_theta == theta
    batch_tokens = stage.train.batch_size * seq_len
    published_batch = row.get("batch_tokens", getattr(module, "TOKENS_PER_BATCH", None))
    if published_batch is not None:  # eabf100's batch is unpublished
      assert batch_tokens == float(published_batch)
    if row["tokens"] == "unpublished":
      assert tokens is None
    else:  # whole batches: the step count rounds tokens / tokens-per-batch
      assert float(row["tokens"]) == tokens
      assert abs(stage.train.steps * batch_tokens - tokens) <= batch_tokens / 2
    for column, text in row.items():
      if column in ("stage", "seq_len", "rope_theta", "tokens", "batch_tokens", "source"):
        continue
      assert column in _STAGE_COLUMNS, f"{path}: column {column!r} checks nothing"
      expected = None if text == _NONE else _value(text)
      assert _STAGE_COLUMNS[column](stage, carried[k]) == expected, (column, k + 1)
    if "lr" not in row:
      assert stage.train.lr == module.LR
    for setting in _table(path, "setting"):
      assert _setting(stage, setting["setting"]) == _value(setting["value"]), setting
    validate_config(stage, num_devices=module.POD_CHIPS)
  _check_mixture(path, stages, full=True)


@pytest.mark.parametrize("path", RECIPES)
def test_cpu_size_keeps_the_recipe_shape(path):
  module = load_module(path)
  config = load_config(f"{path}:runlocal")
  stages = stage_configs(config)
  # A one-stage recipe from a released model gets a stage that stands in for its
  # pretraining (BASE: the model's own length and θ), then the published stages.
  base = [module.BASE] if hasattr(module, "BASE") else []
  shapes = [(*b, None) for b in base] + list(module.PUBLISHED)
  assert len(stages) == len(shapes)
  steps = [stage.train.steps for _, stage in stages]
  tokens = [t for _, _, t in module.PUBLISHED]
  if isinstance(module.CPU_STEPS, int):  # the published token ratios
    assert steps == list(steps_in_ratio(tokens, module.CPU_STEPS))
  else:
    assert steps == list(module.CPU_STEPS)
  for (seq_len, theta, _), (_, stage) in zip(shapes, stages, strict=True):
    T = stage.data.seq_len
    assert T == seq_len // module.CPU_DIVISOR == stage.model.max_position_embeddings
    scaled = scaled_rope_theta(theta, seq_len, T)  # rounded to one decimal
    assert math.isclose(stage.model.rope.rope_theta, scaled, rel_tol=1e-3, abs_tol=0.05)
    assert stage.eval.ppl_lengths == (stages[-1][1].data.seq_len,)  # each stage at the final length
    validate_config(stage, num_devices=1)  # a laptop CPU
  settings = _table(path, "setting")
  for setting in settings if "eabf" not in path else ():  # eabf's lengths are rescaled
    for _, stage in stages:
      assert _setting(stage, setting["setting"]) == _value(setting["value"]), setting
  _check_mixture(path, stages[len(base) :], full=False)
  spec = stages_spec(config)
  assert [p.after for p in spec.points] == [None] + [p.name for p in spec.points[:-1]]
  smoke = stage_configs(load_config(f"{path}:smoke"))
  assert len(smoke) == len(stages) and all(s.train.steps == 2 for _, s in smoke)


def test_prolong_keeps_its_ratios_and_optimizer_state_at_cpu_size():
  module = load_module("configs/recipes/prolong.py")
  (_, short), (_, long) = stage_configs(load_config("configs/recipes/prolong.py:runlocal"))
  published = [s * t for s, t in zip(module.STEPS, module.TOKENS_PER_STEP, strict=True)]
  cpu = [s.train.steps * s.train.batch_size * s.data.seq_len for s in (short, long)]
  assert cpu[0] / cpu[1] == published[0] / published[1]  # equal tokens in both stages
  assert short.train.steps / long.train.steps == module.STEPS[0] / module.STEPS[1]
  assert short.train.lr / long.train.lr == module.LRS[0] / module.LRS[1]
  points = stages_spec(load_config("configs/recipes/prolong.py:runlocal")).points
  assert points[1].overrides["train.carry_optimizer_state"] is True
  assert not points[0].overrides["train.carry_optimizer_state"]
  # The 512K-equivalent stage's long stand-ins hold documents of at least one 4,096 row.
  sizes = {e["name"]: e["source"].get("min_bytes") for e in long.data.mixture}
  assert sizes["book2-524288"] == long.data.seq_len and sizes["book2-65536"] == short.data.seq_len


def test_eabf_scales_the_query_past_two_layers_at_every_size():
  for arg, original in (("", 4096), (":runlocal", 128), (":smoke", 32)):
    config = load_config(f"configs/recipes/eabf100.py{arg}")
    _, stage = stage_configs(config)[-1]
    rope = stage.model.rope
    assert (rope.rope_type, rope.eabf_unscaled_layers) == ("eabf", 2)
    assert rope.original_max_position_embeddings == original
    assert stage.model.num_layers > 2  # some layer scales its query
    assert stage.train.steps == (6 if arg != ":smoke" else 2)
    if arg == ":runlocal":  # the 100 samples: ~100 standard-library files of 1-2 rows
      samples = stage.data.mixture[0]["source"]
      assert (samples["min_bytes"], samples["max_bytes"]) == (512, 1024)
      assert 50 <= len(build_source(samples, "train")) <= 200


def test_qwen_long_and_short_sources_split_at_the_stage_length():
  stages = stage_configs(load_config("configs/recipes/qwen25_1m.py:runlocal"))
  for k, (_, stage) in enumerate(stages, 1):
    if k < 3:
      assert stage.data.mixture is None  # Qwen2.5's own pretraining stages
      continue
    long, short = (e["source"] for e in stage.data.mixture)
    assert long["min_bytes"] == short["max_bytes"] == stage.data.seq_len
  full = load_config("configs/recipes/qwen25_1m.py:start_stage=3")
  assert [s.data.seq_len for _, s in stage_configs(full)] == [65536, 131072, 262144]


@pytest.mark.parametrize("path", RECIPES[1:])
def test_full_size_fails_clearly_without_its_checkpoint_or_data(path, tmp_path):
  """Training needs init_from and the data: a missing one fails in one sentence naming it."""
  name = os.path.basename(path)
  with pytest.raises(ConfigError, match=rf"{name}:init_from=\.\.\. .* set|add"):
    load_config(f"{path}:init_from=/models/x")
  config = load_config(path)
  assert config.init_from.startswith(f"<required: configs/recipes/{name}:init_from=")
  spec = stages_spec(config)
  with pytest.raises(ConfigError, match="required: .*init_from=.* is not a folder"):
    validate_config(point_config(spec, spec.points[0], sweep_dir=str(tmp_path)))
  _, stage = stage_configs(config)[-1]
  source = stage.data.mixture[0]["source"] if stage.data.mixture else stage.data.source
  with pytest.raises(DataPathNotFoundError, match=rf"required: .*{re.escape(name)}:\w"):
    build_source(source, "train")


def test_stdlib_size_filter_keeps_the_split_and_the_bounds():
  root = stdlib_root()
  every = build_source({"kind": "stdlib"}, "train")
  held_out = build_source({"kind": "stdlib"}, "validation")
  held_out_names = {describe_document(held_out, i) for i in range(len(held_out))}
  long = build_source({"kind": "stdlib", "min_bytes": 4096}, "train")
  short = build_source({"kind": "stdlib", "min_bytes": 256, "max_bytes": 4096}, "train")
  names = {}
  for label, docs in (("long", long), ("short", short)):
    names[label] = {describe_document(docs, i) for i in range(len(docs))}
    sizes = [os.path.getsize(os.path.join(root, n)) for n in names[label]]
    assert sizes and (
      min(sizes) >= 4096 if label == "long" else 256 <= min(sizes) <= max(sizes) < 4096
    )
  assert not (names["long"] | names["short"]) & held_out_names
  assert not names["long"] & names["short"]
  assert names["long"] | names["short"] <= {describe_document(every, i) for i in range(len(every))}
  assert long[0] == open(os.path.join(root, describe_document(long, 0)), "rb").read()
  for bad, match in (
    ({"min_bytes": -1}, "min_bytes=-1 must be an integer >= 0"),
    ({"min_bytes": 10, "max_bytes": 10}, "max_bytes=10 must exceed source.min_bytes=10"),
    ({"max_bytes": "big"}, "max_bytes='big' must be an integer"),
  ):
    with pytest.raises(ConfigError, match=match):
      build_source({"kind": "stdlib", **bad}, "train")
  with pytest.raises(ConfigError, match="min_bytes does not apply to kind 'jsonl'"):
    build_source({"kind": "jsonl", "path": "x", "min_bytes": 1}, "train")


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


@pytest.mark.parametrize("name", [os.path.basename(p)[:-3] for p in RECIPES])
def test_recipes_load_from_any_working_directory(name, tmp_path, monkeypatch):
  """`configs/recipes/NAME.py` resolves outside the checkout (Colab), as lcjax.configs.recipes."""
  monkeypatch.chdir(tmp_path)
  for spec in (f"configs/recipes/{name}.py:smoke", f"recipes/{name}:smoke"):
    assert load_config(spec).stages, spec


def test_llama2_long_offers_13b_with_the_same_recipe():
  (_, seven), (_, thirteen) = (
    stage_configs(load_config(f"configs/recipes/llama2_long.py:size={s}"))[0] for s in ("7b", "13b")
  )
  assert (thirteen.model.d_model, thirteen.model.num_layers) == (5120, 40)
  assert (thirteen.train.lr, thirteen.data.seq_len) == (seven.train.lr, seven.data.seq_len)
  validate_config(thirteen, num_devices=64)
  with pytest.raises(ConfigError, match="size='70b' is unknown; use one of 7b, 13b"):
    load_config("configs/recipes/llama2_long.py:size=70b")


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES)
def test_smoke_chain_runs(path, tmp_path):
  """`scripts/train.py --config RECIPE:smoke` runs every stage (README: the recipes' commands)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "chain"
  argv = [sys.executable, "scripts/train.py", "--config", f"{path}:smoke"]
  argv += ["--workdir", str(workdir)]
  env = {**os.environ, "XLA_FLAGS": os.environ.get("LCJAX_TEST_XLA_FLAGS", "")}  # one device
  result = subprocess.run(
    argv, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  stages = sorted(p.name for p in workdir.glob("stage-*") if p.is_dir())
  assert len(stages) == len(stage_configs(load_config(f"{path}:smoke"))), stages
  assert (workdir / "results.csv").exists()


def test_cpu_stage_scales_rows_and_theta_and_keeps_tokens_per_step():
  stage = cpu_stage(32768, 5e5, 32, steps=9, warmup_steps=2, tokens_per_step=8192)
  assert stage["data.seq_len"] == stage["model.max_position_embeddings"] == 1024
  rope = stage["model.rope"]
  assert rope["max_position_embeddings"] == 1024 and rope["rope_type"] == "default"
  assert rope["rope_theta"] == round(scaled_rope_theta(5e5, 32768, 1024), 1) < 5e5
  assert (stage["train.batch_size"], stage["train.steps"], stage["train.warmup_steps"]) == (8, 9, 2)
  assert stage["checkpoint.every_steps"] == 4
  assert (
    cpu_stage(32768, 5e5, 32, steps=1, warmup_steps=0, tokens_per_step=8192, smoke=True)[
      "train.batch_size"
    ]
    == 2
  )
