"""Ahead-of-time compilation of a training step for a TPU topology, from a CPU host.

With `libtpu` installed, `jax.experimental.topologies.get_topology_desc` returns TPU
devices that XLA compiles for without hardware: the full train step (ring attention,
FSDP/tensor sharding, AdamW) is lowered on the config's mesh over those devices, and
`memory_analysis()` / `cost_analysis()` say what each chip would hold and compute.
The step is traced under `target_platform` of the devices' platform, so `impl="auto"`
resolves to the Pallas kernels (lowered through Mosaic) for a TPU topology, not to the
pure-JAX twin the CPU host would pick. Host memory (`pinned_host`, what the offload remat
policies move there) is summed over the devices that share a host and checked against
`train.host_memory_budget_gib`. This is how a pod run is checked before paying for it:

  python scripts/train.py --config configs/NAME.py --workdir /tmp/aot \
      --compile_only --topology v5p:4x4x4

With LCJAX_XLA_DUMP_TO=DIR set, XLA writes the compiled step's HLO, buffer assignment and
memory-usage report there (`DUMP_ENV`): where a step's memory goes, buffer by buffer.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import jax
from jax.experimental import topologies

from lcjax.attention import resolve_impl, target_platform
from lcjax.config import ConfigError
from lcjax.parallel.mesh import make_mesh
from lcjax.parallel.sharding import tree_shardings
from lcjax.train.config import validate_config
from lcjax.train.flops import flops_per_token
from lcjax.train.run_model import abstract_setup, batch_spec, run_train_step

__all__ = [
  "check_host_memory",
  "compile_train_step",
  "format_report",
  "lower_train_step",
  "HBM_BYTES",
  "topology_devices",
]

GiB = 2**30
# HBM per chip (vendor figures), by the device_kind prefix the topology reports.
HBM_BYTES = {
  "TPU v5 lite": 16 * GiB,
  "TPU v5e": 16 * GiB,
  "TPU v5": 95 * GiB,  # v5p
  "TPU v4": 32 * GiB,
  "TPU v6 lite": 32 * GiB,
  "TPU v6e": 32 * GiB,
}


def topology_devices(topology: str):
  """TPU devices of a topology such as 'v5p:4x4x4' (needs libtpu; no TPU hardware)."""
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology name
    raise ConfigError(
      f"--topology {topology!r} could not be built ({type(e).__name__}: {str(e)[:200]}); install "
      "libtpu (pip install -e '.[tpu_aot]') and use a name like v5p:2x2x1 or v5e:4x4"
    ) from None


def _hbm(device) -> int | None:
  for prefix, size in HBM_BYTES.items():
    if device.device_kind.startswith(prefix):
      return size
  return None


# A folder for XLA's dumps of the compiled step: the optimized HLO, its buffer assignment,
# live ranges and `*memory-usage-report.txt` (which buffers share each slot of HBM, with
# their on-chip layouts). libtpu does not read XLA_FLAGS' --xla_dump_to, so the option
# goes to the compile call.
DUMP_ENV = "LCJAX_XLA_DUMP_TO"


def _compiler_options() -> dict[str, str] | None:
  folder = os.environ.get(DUMP_ENV)
  return {"xla_dump_to": folder} if folder else None


def lower_train_step(config, devices):
  """(compiled train step, RunSetup, mesh) of `config` on `devices` (real or a topology's).

  The state and batch are ShapeDtypeStructs carrying the run's shardings (parameters by
  the path rules, rows over ('data', 'fsdp'), the sequence over 'context'), so nothing
  is allocated. Raises ConfigError when XLA reports that the step does not fit.
  """
  validate_config(config, num_devices=len(devices), platform=devices[0].platform)
  mesh = make_mesh(config.mesh, devices=devices)
  setup = abstract_setup(config)
  shardings = tree_shardings(setup.state, mesh)
  state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), setup.state, shardings
  )
  step = run_train_step(config, setup)
  # Traced on this host, compiled for the devices' platform: "auto" follows the latter.
  with jax.set_mesh(mesh), target_platform(devices[0].platform):
    try:
      compiled = step.lower(state, batch_spec(config, mesh)).compile(_compiler_options())
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      detail = str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
      raise ConfigError(
        f"the train step does not fit a {devices[0].device_kind} ({detail}); raise mesh.fsdp or "
        "mesh.context, set model.remat=full or offload, set model.mlp_chunk, or lower "
        "train.batch_size"
      ) from None
  return compiled, setup, mesh


def compile_train_step(config, topology: str | None = None, *, devices=None) -> dict[str, Any]:
  """Compiles `config`'s train step for `topology` (or `devices`); returns memory and FLOPs.

  Raises ConfigError when the per-device total exceeds the chip's HBM, or when the host
  memory of the devices that share a host exceeds `train.host_memory_budget_gib`.
  """
  if devices is None:
    devices = topology_devices(topology)
  compiled, setup, mesh = lower_train_step(config, devices)
  rows, seq_len = config.train.batch_size, config.data.seq_len
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  per_device = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  # Host (pinned_host) memory of one device's program; a host holds it for each of its
  # devices. The topology's devices carry their host's process index (v5p: 4 per host).
  host_per_device = (
    mem.host_argument_size_in_bytes
    + mem.host_output_size_in_bytes
    + mem.host_temp_size_in_bytes
    - mem.host_alias_size_in_bytes
  )
  devices_per_host = max(Counter(d.process_index for d in devices).values())
  hbm = _hbm(devices[0])
  report = dict(
    topology=topology or devices[0].platform,
    device_kind=devices[0].device_kind,
    devices=len(devices),
    mesh=dict(mesh.shape),
    n_params=setup.n_params,
    tokens_per_step=rows * seq_len,
    argument_bytes=mem.argument_size_in_bytes,
    output_bytes=mem.output_size_in_bytes,
    alias_bytes=mem.alias_size_in_bytes,
    temp_bytes=mem.temp_size_in_bytes,
    per_device_bytes=per_device,
    hbm_bytes=hbm,
    host_bytes_per_device=host_per_device,
    devices_per_host=devices_per_host,
    host_bytes_per_host=host_per_device * devices_per_host,
    host_budget_bytes=config.train.host_memory_budget_gib * GiB,
    attention_impl=resolve_impl(config.attention.impl, platform=devices[0].platform),
    # XLA's cost analysis counts a while loop's body once, so with scanned layers (and
    # chunked MLPs and losses) it undercounts by about the trip count; the model's own
    # count (6N + attention per token, lcjax.train.flops) is the figure to plan with.
    flops_per_device=float(cost.get("flops", 0.0)) if cost else None,
    model_flops_per_device=flops_per_token(setup.model_cfg, setup.n_params, seq_len)
    * rows
    * seq_len
    / len(devices),
  )
  if hbm is not None and per_device > hbm:
    raise ConfigError(
      f"the train step needs {per_device / GiB:.1f} GiB per device but a {devices[0].device_kind} "
      f"has {hbm / GiB:.0f} GiB; raise mesh.fsdp or mesh.context, set model.remat=full or "
      "offload, set model.mlp_chunk, or lower train.batch_size"
    )
  check_host_memory(report)
  return report


def check_host_memory(report: dict[str, Any]) -> None:
  """Raises ConfigError when one host's share of host memory exceeds its budget."""
  need, budget = report["host_bytes_per_host"], report["host_budget_bytes"]
  if need > budget:
    raise ConfigError(
      f"the train step needs {need / GiB:.1f} GiB of host memory per host "
      f"({report['devices_per_host']} devices x {report['host_bytes_per_device'] / GiB:.1f} "
      f"GiB) but train.host_memory_budget_gib={budget / GiB:g}; set model.remat to a policy "
      "other than offload/offload_dots, raise mesh.fsdp or mesh.context, or raise "
      "train.host_memory_budget_gib"
    )


def format_report(report: dict[str, Any]) -> str:
  """The report as `--compile_only` prints it: mesh, memory per device and host, impl."""
  gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
  lines = [
    f"compiled for {report['topology']} ({report['devices']} x {report['device_kind']}), "
    f"mesh {report['mesh']}",
    f"  params {report['n_params']:,}; tokens per step {report['tokens_per_step']:,}",
    f"  per device: arguments {gib(report['argument_bytes'])}, temp {gib(report['temp_bytes'])}, "
    f"total {gib(report['per_device_bytes'])}"
    + (f" of {gib(report['hbm_bytes'])} HBM" if report["hbm_bytes"] else ""),
    f"  host (pinned_host) per device: {gib(report['host_bytes_per_device'])}; per host "
    f"({report['devices_per_host']} devices): {gib(report['host_bytes_per_host'])} of "
    f"{gib(report['host_budget_bytes'])} budget",
    f"  attention impl: {report['attention_impl']}",
  ]
  lines.append(
    f"  model FLOPs per device per step: {report['model_flops_per_device']:.3e} (6N + attention)"
  )
  if report["flops_per_device"]:
    lines.append(
      f"  XLA cost analysis: {report['flops_per_device']:.3e} FLOPs per device (each loop body "
      "counted once: scanned layers undercount)"
    )
  return "\n".join(lines)
