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
  assert listed == found | {"lcjax.configs"}, listed ^ (found | {"lcjax.configs"})


def test_configs_ship_as_lcjax_configs():
  mapping = dict(line.split("=") for line in _options()["package_dir"].split("\n") if "=" in line)
  assert {k.strip(): v.strip() for k, v in mapping.items()} == {"lcjax.configs": "configs"}
  assert os.path.isfile(os.path.join(ROOT, "configs", "__init__.py"))
