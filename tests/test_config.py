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
