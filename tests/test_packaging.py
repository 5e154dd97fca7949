"""setup.cfg lists every package of the tree, and configs/ ships as `lcjax.configs`."""

import configparser
import os

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _options():
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  return parser["options"]


def test_setup_cfg_lists_every_package():
  listed = set(_options()["packages"].split())
  found = set(
    find_packages(ROOT, include=["lcjax", "lcjax.*", "pallas_kernels", "pallas_kernels.*"])
  )
  configs = {"lcjax.configs"} | {
    f"lcjax.configs.{sub}" for sub in find_packages(os.path.join(ROOT, "configs"))
  }
  assert listed == found | configs, listed ^ (found | configs)


def test_configs_ship_as_lcjax_configs():
  mapping = dict(line.split("=") for line in _options()["package_dir"].split("\n") if "=" in line)
  assert {k.strip(): v.strip() for k, v in mapping.items()} == {"lcjax.configs": "configs"}
  assert os.path.isfile(os.path.join(ROOT, "configs", "__init__.py"))
  # A folder of configs without __init__.py would be left out of an installed lcjax.
  for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
    if any(f.endswith(".py") for f in files) and "__pycache__" not in folder:
      assert os.path.isfile(os.path.join(folder, "__init__.py")), folder
