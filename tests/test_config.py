import pytest

from lcjax.config import ConfigError, parse_arg


def test_parse_arg_types_and_flags():
  cfg = parse_arg(
    "method=yarn,runlocal,steps=7,lr=3e-4", method="default", runlocal=False, steps=10, lr=1e-3
  )
  assert (cfg.method, cfg.runlocal, cfg.steps, cfg.lr) == ("yarn", True, 7, 3e-4)
  assert parse_arg(None, steps=3).steps == 3
  assert parse_arg("runlocal=false", runlocal=True).runlocal is False


@pytest.mark.parametrize(
  "arg, match",
  [
    ("runlocall", "'runlocall' is unknown"),
    ("steps=ten", "steps='ten' is not an integer"),
    ("steps", "needs a value"),
    ("runlocal=maybe", "not a boolean"),
  ],
)
def test_parse_arg_errors(arg, match):
  with pytest.raises(ConfigError, match=match):
    parse_arg(arg, runlocal=False, steps=10)


def _load_config(name, arg):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize(
  "name, arg",
  [
    ("quickstart", "tiny"),
    ("quickstart", None),
    ("longgen_hybrid", "tiny"),
    ("longgen_hybrid", None),
    ("longgen_hybrid", "tiny,sparse=strided"),
    ("longgen_hybrid", "sparse=strided"),
    ("llama3_8b_long", "runlocal"),
  ],
)
def test_shipped_configs_validate(name, arg):
  """Every shipped config (and its small variants) passes validation before tracing."""
  from lcjax.models.config import layer_types
  from lcjax.train.config import validate_config

  config = _load_config(name, arg)
  validate_config(config, num_devices=1 if "llama3" not in name else None)
  if arg and "strided" in arg:
    assert "strided_attention" in layer_types(config.model)


def test_longgen_config_rejects_an_unknown_sparse_layer():
  with pytest.raises(ConfigError, match="sparse='dilated' is unknown"):
    _load_config("longgen_hybrid", "sparse=dilated")
