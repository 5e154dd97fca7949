"""Test setup, before jax is imported: 8 fake CPU devices for mesh tests, fast-compile
XLA flags, and one XLA compilation cache for the whole test session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA:CPU compiling small programs; LLVM's optimizations buy
# nothing for tensors this small, and XLA:CPU's classic elemental emitters compile in about
# half the time of its MLIR fusion emitters (the rope_extrapolation smoke sweep: 8.3 -> 4.2 s
# of compilation). Exactness is unaffected (no fast-math), and every test that compares two
# runs compiles both with the same flags. Only XLA:CPU reads these: a TPU compile is
# unchanged. Subprocesses started by the tests take them from LCJAX_TEST_XLA_FLAGS with their
# own device count.
TEST_XLA_FLAGS = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_use_fusion_emitters=false"
)
os.environ.setdefault("LCJAX_TEST_XLA_FLAGS", TEST_XLA_FLAGS)
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " " + os.environ["LCJAX_TEST_XLA_FLAGS"]
os.environ["XLA_FLAGS"] = _flags.strip()
# libtpu (installed for the TPU compile checks) takes a lockfile per process; tests that
# compile for TPU may run beside another process that loaded it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# The suite compiles many identical small programs: every training subprocess compiles
# the same step, and the xdist workers compile the same fixtures. One persistent
# compilation cache, made fresh for each session (so a run's time never depends on an
# earlier run), is shared by the workers and the subprocesses, which inherit this
# environment. The process that makes it removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="lcjax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Files whose tests are long end-to-end runs (subprocesses, whole training runs): run
# them first, so the workers never end on one of them while the other sits idle.
_LONG_FIRST = (
  "test_readme_commands.py",
  "test_notebooks.py",
  "test_multiprocess.py",
  "test_train.py",
  "test_context_parallel_train.py",
  "test_stages.py",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
