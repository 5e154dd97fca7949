"""Test setup: 8 fake CPU devices for mesh tests, set before jax is imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# libtpu (installed for the TPU compile checks) takes a lockfile per process; tests that
# compile for TPU may run beside another process that loaded it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
