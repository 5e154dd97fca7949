"""Config helpers shared by every `configs/NAME.py` (big_vision style).

`parse_arg` turns the `:k=v,flag` suffix of `--config configs/NAME.py:ARGS` into a
ConfigDict whose fields keep the types of the defaults, so a typo or a wrong type
fails at once with a sentence naming the key.
"""

from __future__ import annotations

from typing import Any

import ml_collections

__all__ = ["parse_arg", "ConfigError", "require"]


class ConfigError(ValueError):
  """An invalid configuration; the message names the field and the fix."""


def _coerce(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", ""):
      return True
    if lowered in ("0", "false", "no"):
      return False
    raise ConfigError(f"config arg {key}={text!r} is not a boolean; use {key}=true or {key}=false")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"config arg {key}={text!r} is not an integer") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"config arg {key}={text!r} is not a number") from None
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"k=v,flag,k2=v2"` against typed `defaults`.

  A bare `flag` sets a boolean default to True. Unknown keys raise, listing the
  known ones, so `runlocall` cannot silently do nothing.

  >>> parse_arg("method=yarn,runlocal", method="default", runlocal=False, steps=10)
  method: yarn
  runlocal: true
  steps: 10
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      known = ", ".join(sorted(defaults)) or "(none)"
      raise ConfigError(f"config arg {key!r} is unknown; known args: {known}")
    default = defaults[key]
    if not sep and not isinstance(default, bool):
      raise ConfigError(f"config arg {key!r} needs a value: write {key}=VALUE")
    values[key] = _coerce(key, text.strip(), default)
  return ml_collections.ConfigDict(values)


def require(condition: bool, message: str) -> None:
  """Raises `ConfigError(message)` unless `condition`; message: one sentence, field + fix."""
  if not condition:
    raise ConfigError(message)
