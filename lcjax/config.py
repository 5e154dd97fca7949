"""Config helpers shared by every `configs/NAME.py` (big_vision style).

`parse_arg` turns the `:k=v,flag` suffix of `--config configs/NAME.py:ARGS` into a
ConfigDict whose fields keep the types of the defaults, so a typo or a wrong type
fails at once with a sentence naming the key. `load_config` is the one way code
(notebooks, benchmarks, tests, the sweep runner) loads a config file by name:

  config = load_config("configs/quickstart.py:tiny", overrides={"train.steps": 20})
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

__all__ = [
  "ConfigError",
  "apply_overrides",
  "check_kind_options",
  "check_override_flags",
  "config_path",
  "load_config",
  "load_module",
  "parse_arg",
  "require",
]


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


def check_kind_options(
  options: Mapping[str, Any],
  *,
  field: str,
  kind: str,
  allowed_by_kind: Mapping[str, Any],
  known: Any,
  what: str,
) -> None:
  """Raises a ConfigError naming `{field}.{key}` for a set option that `kind` does not read.

  For configs whose valid options depend on a `kind` (data sources, tokenizers): every
  option of every kind exists in the config so the command line can set it, None means
  unset, and a set option the chosen kind ignores is an error rather than a silent no-op.
  Kinds outside `allowed_by_kind` are not checked (their builder rejects or defines them).
  """
  if kind not in allowed_by_kind:
    return
  allowed = allowed_by_kind[kind]
  for key, value in options.items():
    if value is None or key in allowed:
      continue
    problem = f"does not apply to kind {kind!r}" if key in known else f"is not a {what} option"
    raise ConfigError(f"{field}.{key} {problem}; options for {kind!r}: {', '.join(allowed)}")


def require(condition: bool, message: str) -> None:
  """Raises `ConfigError(message)` unless `condition`; message: one sentence, field + fix."""
  if not condition:
    raise ConfigError(message)


# The configs/ folder of a source checkout (editable installs, Colab clones); wheels ship
# the same files as the package `lcjax.configs` (setup.cfg's package_dir).
_CHECKOUT_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def config_path(spec: str) -> tuple[str, str | None]:
  """(file, arg) of a config spec "configs/NAME.py[:ARGS]" (or "NAME[:ARGS]").

  The file is the path as given when it exists (relative to the working directory),
  else configs/NAME.py (or a subfolder, configs/recipes/NAME.py) of this lcjax checkout, else
  the installed `lcjax.configs.NAME`.
  """
  path, sep, arg = spec.partition(":")
  candidates = [path]
  # Under the configs folder: the part after "configs/" ("recipes/lwm.py" of
  # "configs/recipes/lwm.py"), or the spec as written ("recipes/lwm"), or its file name.
  parts = os.path.normpath(path).split(os.sep)
  if "configs" in parts[:-1]:
    parts = parts[len(parts) - parts[::-1].index("configs") :]
  names = [os.path.join(*parts), parts[-1]]
  names = list(dict.fromkeys(n if n.endswith(".py") else f"{n}.py" for n in names))
  roots = [_CHECKOUT_CONFIGS]
  installed = importlib.util.find_spec("lcjax.configs")
  if installed is not None and installed.submodule_search_locations:
    roots += list(installed.submodule_search_locations)
  candidates += [os.path.join(root, name) for root in roots for name in names]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate, (arg if sep else None)
  raise ConfigError(
    f"config file {path!r} not found (looked in {', '.join(dict.fromkeys(candidates))}); "
    "give a path to configs/NAME.py"
  )


def load_module(path: str):
  """The Python module of a config file (`get_config`, and a sweep's `sweep`, `metrics`)."""
  module_name = "lcjax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _field_error(config, dotted: str) -> str | None:
  """Why `dotted` names no field of `config` (one sentence), or None when it does."""
  node, walked = config, []
  for part in dotted.split("."):
    fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict | Mapping) else None
    if fields is None:
      return f"config.{'.'.join(walked)} is a value, not a section; it has no field {part!r}"
    if part not in fields:
      where = f"config.{'.'.join(walked)}" if walked else "the config"
      return f"{where} has no field {part!r}; its fields are {', '.join(sorted(fields))}"
    node, walked = node[part], walked + [part]
  return None


# Sections of a run config (`lcjax.train.config.base_config`) whose keys the user names:
# an override may create a key inside them ("model_overrides.rope", "eval.rope_variants.yarn4").
OPEN_SECTIONS = ("model_overrides", "eval.rope_variants")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted fields ({"train.steps": 20, "model.rope": {...}}) on `config` in place.

  A field that does not exist, or a value of the wrong type for a locked config, is a
  ConfigError naming the field; fields are never created, except keys directly inside
  an `OPEN_SECTIONS` section (e.g. "model_overrides.rope").
  """
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    open_section = ".".join(parents) in OPEN_SECTIONS
    problem = _field_error(config, ".".join(parents) if open_section else dotted)
    if problem is not None:
      raise ConfigError(f"override {dotted}: {problem}")
    node = config
    for part in parents:
      node = node[part]
    if isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    try:
      if open_section and leaf not in node:
        with node.unlocked():
          node[leaf] = value
      else:
        node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"override {dotted}={value!r}: {e}") from None


def load_config(
  spec: str, overrides: Mapping[str, Any] | None = None, *, lock: bool = True
) -> ml_collections.ConfigDict:
  """The ConfigDict of "configs/NAME.py[:ARGS]": `get_config(ARGS)`, then `overrides`.

  `overrides` maps dotted field names to values, as `--config.a.b=value` does on the
  command line. The result is locked (a misspelt field raises) unless `lock=False`.
  """
  path, arg = config_path(spec)
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None); see configs/quickstart.py")
  config = module.get_config(arg)
  if lock:
    config.lock()
  apply_overrides(config, overrides or {})
  return config


def check_override_flags(argv: list[str], flag: str = "config") -> None:
  """Checks the `--config.a.b=v` flags of `argv` name fields of the `--config` file.

  Raises a one-sentence ConfigError for a config file that does not load (a bad path
  or `:ARGS`) and for an override of a field that does not exist, instead of the
  traceback ml_collections' flag parser raises. Values are checked by that parser.
  """
  spec, names = None, []
  for i, item in enumerate(argv):
    if item == f"--{flag}" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif item.startswith(f"--{flag}="):
      spec = item.split("=", 1)[1]
    elif item.startswith(f"--{flag}."):
      names.append(item[len(flag) + 3 :].split("=", 1)[0])
  if spec is None:
    return
  config = load_config(spec)
  for name in names:
    problem = _field_error(config, name)
    if problem is not None:
      raise ConfigError(f"--{flag}.{name}: {problem}")
