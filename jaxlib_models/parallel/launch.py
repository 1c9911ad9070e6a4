r"""Multi-host launch: cluster resolution, distributed init, XLA flag presets.

`resolve_cluster` turns the launcher's environment into a `ClusterSpec`
(coordinator "host:port", process count and id, local devices); `initialize`
passes it to `jax.distributed.initialize` once per process, before any JAX
computation. Nothing here contacts a coordinator except `initialize`.

Sources, field by field, first match wins:

1. Arguments of `resolve_cluster` (all three given: source "explicit").
2. Explicit environment: JAXLIB_COORDINATOR ("host" or "host:port"),
   JAXLIB_NUM_PROCESSES, JAXLIB_PROCESS_ID. JAX_COORDINATOR_ADDRESS,
   JAX_NUM_PROCESSES and JAX_PROCESS_ID are accepted as aliases.
3. Slurm, inside an `srun` step: SLURM_NTASKS, SLURM_PROCID, the first host of
   SLURM_STEP_NODELIST as coordinator; local devices from SLURM_LOCALID,
   SLURM_NODEID, SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_GPUS and
   CUDA_VISIBLE_DEVICES (`_slurm_local_devices`).
4. Kubernetes (indexed Job or JobSet): process id JOB_COMPLETION_INDEX, plus
   JAXLIB_JOB_INDEX * JAXLIB_PODS_PER_JOB for JobSets with several replicated
   Jobs; JAXLIB_NUM_PROCESSES and JAXLIB_COORDINATOR come from the YAML (see
   examples/launch/k8s/jobset.yaml). JAX's own Kubernetes detection needs the
   `kubernetes` package and RBAC permission to list pods; this path needs
   neither, only env vars set in the pod spec.
5. Otherwise a single process.

Port: JAX_COORDINATOR_PORT (JAX's own variable), else `port`, else 8476.
Local devices: JAX_LOCAL_DEVICE_IDS ("0,1,...", JAX's own variable) wins over
the Slurm derivation. Partial or inconsistent settings raise `ValueError`
naming the variable and what to set. JAXLIB_DISTRIBUTED=0 makes `initialize`
skip all of this and run single-process.

Dry run and flag presets from the shell:

  python -m jaxlib_models.parallel.launch --print
  export XLA_FLAGS="$XLA_FLAGS $(python -m jaxlib_models.parallel.launch \
      --xla-flags=h100)"
"""

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8476
SOURCES = ("explicit", "slurm", "kubernetes", "single")

# (primary, alias) environment names of the explicit settings.
_COORDINATOR_VARS = ("JAXLIB_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
_NUM_VARS = ("JAXLIB_NUM_PROCESSES", "JAX_NUM_PROCESSES")
_PID_VARS = ("JAXLIB_PROCESS_ID", "JAX_PROCESS_ID")

_SKIP_HINT = "; or set JAXLIB_DISTRIBUTED=0 to run this process alone"

# Overlap flags for H100 clusters (brief §2.6, after MaxText's A3 scripts).
# The brief spells the pipelining flags `--xla_gpu_pipeline_all_gather=on`
# etc.; jaxlib 0.10.2 does not know those names and aborts at start-up
# ("Unknown flag in XLA_FLAGS"), so the boolean `enable_pipelined_*` flags
# are used. tests/parallel/test_launch.py starts XLA with every preset.
_H100_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
)
# Collective matmul for tensor parallelism: windowed einsums on several
# streams, for every size (threshold 0 MiB).
_TP_FLAGS = (
    "--xla_gpu_multi_streamed_windowed_einsum=true",
    "--xla_gpu_threshold_for_windowed_einsum_mib=0",
)
PRESETS = {"h100": _H100_FLAGS, "h100_tp": _H100_FLAGS + _TP_FLAGS}
_CPU_SIM = "cpu_sim:"


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """Where this process sits in a multi-process JAX job.

  Attributes:
    coordinator_address: "host:port" of process 0's coordination service;
      None for a single process.
    num_processes: number of JAX processes in the job.
    process_id: this process, in [0, num_processes).
    local_device_ids: device ordinals (as CUDA numbers them after
      CUDA_VISIBLE_DEVICES) this process drives; None = every visible one.
    source: "explicit", "slurm", "kubernetes" or "single".
  """

  coordinator_address: str | None
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None
  source: str

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"{self.source=} must be one of {SOURCES}")
    if self.num_processes < 1:
      raise ValueError(f"{self.num_processes=} must be >= 1")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(
          f"{self.process_id=} must lie in [0, {self.num_processes})"
      )
    if self.num_processes > 1 and not self.coordinator_address:
      raise ValueError("a multi-process job needs a coordinator_address")
    if self.coordinator_address is not None:
      _check_address(self.coordinator_address, "coordinator_address")

  @property
  def is_multiprocess(self) -> bool:
    return self.num_processes > 1

  def to_json(self) -> str:
    """One JSON line (the `--print` output)."""
    return json.dumps(dataclasses.asdict(self))


# --------------------------------------------------------------------------
# Parsing helpers.


def _int_var(
    env: Mapping[str, str], name: str, hint: str, minimum: int = 0
) -> int:
  """Reads env[name] as an int >= minimum; ValueError naming it otherwise."""
  raw = env.get(name)
  if raw is None:
    raise ValueError(f"{name} is not set; {hint}")
  try:
    value = int(raw.strip())
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not an integer; {hint}") from None
  if value < minimum:
    raise ValueError(f"{name}={raw!r} must be >= {minimum}; {hint}")
  return value


def _check_address(address: str, what: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
        f"{what}={address!r} is not 'host:port' with a port in [1, 65535]"
    )


def _with_port(address: str, port: int, what: str) -> str:
  """Appends ':port' to a bare host name; checks an existing port."""
  address = address.strip()
  if address.count(":") > 1 and not address.startswith("["):
    address = f"[{address}]"  # A bare IPv6 address.
  if ":" not in address or address.endswith("]"):
    address = f"{address}:{port}"
  _check_address(address, what)
  return address


def _split_top_level(text: str, var: str) -> list[str]:
  """Splits at commas outside brackets; checks bracket balance."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch == "[":
      depth += 1
      if depth > 1:
        raise ValueError(f"{var}={text!r}: nested '[' at position {i}")
    elif ch == "]":
      depth -= 1
      if depth < 0:
        raise ValueError(f"{var}={text!r}: unmatched ']' at position {i}")
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"{var}={text!r}: unclosed '['")
  parts.append(text[start:])
  return parts


def _expand_range(body: str, var: str, text: str) -> list[str]:
  """Expands a bracket body: 001-003,7 -> 001 002 003 7 (Slurm padding)."""
  out = []
  for piece in body.split(","):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
    if not m:
      raise ValueError(
          f"{var}={text!r}: bad range {piece!r} in '[{body}]' (expected N or"
          " N-M with digits)"
      )
    lo, hi = m.group(1), m.group(2)
    if hi is None:
      out.append(lo)
      continue
    if int(hi) < int(lo):
      raise ValueError(f"{var}={text!r}: empty range {piece!r}")
    width = len(lo)  # Slurm pads to the width of the lower bound.
    out.extend(str(k).zfill(width) for k in range(int(lo), int(hi) + 1))
  return out


def expand_hostlist(nodelist: str, var: str = "nodelist") -> list[str]:
  """Expands a Slurm host list such as "node[001-003,007],gpu-a".

  Supports comma-separated items, bracketed ranges with zero padding (the
  width of the lower bound, as Slurm writes them) and several bracket groups
  per item ("r[1-2]-n[01-02]": Cartesian product, first group slowest).

  Args:
    nodelist: the compressed list, e.g. the value of SLURM_STEP_NODELIST.
    var: the variable it came from, named in errors.

  Returns:
    The host names in order.

  Raises:
    ValueError: on an empty list, unbalanced or nested brackets, or a range
      that is not N or N-M with N <= M.
  """
  text = nodelist.strip()
  if not text:
    raise ValueError(f"{var} is empty; expected e.g. 'node[001-004]'")
  hosts = []
  for item in _split_top_level(text, var):
    if not item:
      raise ValueError(f"{var}={nodelist!r}: empty host name")
    pieces = re.split(r"\[([^\[\]]*)\]", item)
    choices = []
    for k, piece in enumerate(pieces):
      if k % 2:  # a bracket body
        if not piece:
          raise ValueError(f"{var}={nodelist!r}: empty '[]'")
        choices.append(_expand_range(piece, var, nodelist))
      else:
        choices.append([piece])
    hosts.extend("".join(p) for p in itertools.product(*choices))
  return hosts


def _expand_counts(text: str, var: str) -> list[int]:
  """Slurm's per-node task counts, "2(x3),1" -> [2, 2, 2, 1]."""
  counts = []
  for piece in text.split(","):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", piece.strip())
    if not m:
      raise ValueError(
          f"{var}={text!r}: cannot parse {piece!r} (expected N or N(xM));"
          " it is set by srun, do not override it"
      )
    counts.extend([int(m.group(1))] * int(m.group(2) or 1))
  return counts


def _device_list(text: str | None) -> list[str] | None:
  """Tokens of a CUDA_VISIBLE_DEVICES / SLURM_STEP_GPUS style list."""
  if text is None or not text.strip():
    return None
  return [t for t in text.split(",") if t.strip()]


def _parse_device_ids(text: str, var: str) -> tuple[int, ...]:
  try:
    ids = tuple(int(t) for t in text.split(","))
  except ValueError:
    raise ValueError(
        f"{var}={text!r} must be comma-separated integers, e.g. '0,1,2,3'"
    ) from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f"{var}={text!r} must list distinct ids >= 0")
  return ids


def _explicit_env(
    env: Mapping[str, str], names: tuple[str, str]
) -> tuple[str, str] | None:
  """(name, value) of the primary or alias variable; both must agree."""
  found = [(n, env[n]) for n in names if env.get(n, "").strip()]
  if len(found) == 2 and found[0][1].strip() != found[1][1].strip():
    raise ValueError(
        f"{found[0][0]}={found[0][1]!r} and {found[1][0]}={found[1][1]!r}"
        f" disagree; set only {names[0]}"
    )
  return found[0] if found else None


# --------------------------------------------------------------------------
# Schedulers: one reader per field, called only when no explicit value exists,
# so an explicit value makes the scheduler's variable for that field optional.

_BY_SRUN = "it is set by srun for each task"


def _slurm_num(env: Mapping[str, str]) -> tuple[str, int]:
  hint = "launch with srun --ntasks=N (or sbatch --ntasks-per-node)"
  n = _int_var(env, "SLURM_NTASKS", hint, minimum=1)
  in_step = "SLURM_STEP_NODELIST" in env or "SLURM_STEP_ID" in env
  if n > 1 and not in_step:
    raise ValueError(
        f"SLURM_NTASKS={n} but SLURM_STEP_NODELIST is not set: this is the"
        " batch script itself, not one of the srun tasks. Start the program"
        " with `srun python -m ...`, or set SLURM_NTASKS=1" + _SKIP_HINT
    )
  return "SLURM_NTASKS", n


def _slurm_hosts(env: Mapping[str, str]) -> tuple[str, list[str]]:
  """(variable, hosts) of the step's node list."""
  var = "SLURM_STEP_NODELIST"
  if var not in env and "SLURM_STEP_ID" in env and "SLURM_JOB_NODELIST" in env:
    var = "SLURM_JOB_NODELIST"  # A step without its own list (old Slurm).
  if var not in env:
    raise ValueError(
        "SLURM_STEP_NODELIST is not set: start the program with srun, which"
        " sets it, or set JAXLIB_COORDINATOR=host:port" + _SKIP_HINT
    )
  return var, expand_hostlist(env[var], var)


def _slurm_coordinator(
    env: Mapping[str, str], port: int, num: int, pid: int
) -> str:
  var, hosts = _slurm_hosts(env)
  if var == "SLURM_STEP_NODELIST" and len(hosts) > num:
    raise ValueError(
        f"SLURM_STEP_NODELIST={env[var]!r} has {len(hosts)} hosts but"
        f" SLURM_NTASKS={num}: every node of the step runs a task, so the"
        " two disagree; do not override either by hand"
    )
  node = env.get("SLURMD_NODENAME")
  if pid == 0 and node and node != hosts[0]:
    raise ValueError(
        f"process 0 runs on SLURMD_NODENAME={node!r}, but the coordinator"
        f" would be the first host of {var} ({hosts[0]!r}). Use the default"
        " block task distribution, or set JAXLIB_COORDINATOR to process 0's"
        " host:port"
    )
  return f"{hosts[0]}:{port}"


def _slurm_local_devices(
    env: Mapping[str, str], num: int
) -> tuple[int, ...] | None:
  """Devices of this task when several tasks share a node.

  One task per node (the recommended layout: one process drives all of its
  node's GPUs) -> None. Several tasks per node: if Slurm already bound GPUs
  per task (the task sees fewer GPUs than the step has, or fewer than there
  are tasks on the node) -> None; otherwise the visible GPUs are split into
  equal contiguous blocks by SLURM_LOCALID, which with one GPU per task is
  JAX's own convention ([SLURM_LOCALID]). Outside an srun step (no
  SLURM_STEP_TASKS_PER_NODE) -> None.
  """
  if num == 1 or "SLURM_STEP_TASKS_PER_NODE" not in env:
    return None
  per_node = "SLURM_STEP_TASKS_PER_NODE"
  counts = _expand_counts(env[per_node], per_node)
  if len(set(counts)) == 1:
    here = counts[0]
  else:
    node = _int_var(env, "SLURM_NODEID", _BY_SRUN)
    if node >= len(counts):
      raise ValueError(
          f"SLURM_NODEID={node} but {per_node}={env[per_node]!r} lists"
          f" {len(counts)} nodes"
      )
    here = counts[node]
  if here <= 1:
    return None
  local = _int_var(env, "SLURM_LOCALID", _BY_SRUN)
  if local >= here:
    raise ValueError(
        f"SLURM_LOCALID={local} but this node runs {here} tasks"
        " (SLURM_STEP_TASKS_PER_NODE); do not override either by hand"
    )
  visible = _device_list(env.get("CUDA_VISIBLE_DEVICES"))
  step_gpus = _device_list(env.get("SLURM_STEP_GPUS"))
  if visible and step_gpus and len(visible) < len(step_gpus):
    return None  # Slurm bound a subset of the step's GPUs to this task.
  seen = visible or step_gpus
  if seen is None:
    return (local,)
  if len(seen) < here:
    return None  # Fewer GPUs than tasks: each task already has its own.
  if len(seen) % here:
    var = "CUDA_VISIBLE_DEVICES" if visible else "SLURM_STEP_GPUS"
    raise ValueError(
        f"{var} lists {len(seen)} GPUs, which do not split evenly among the"
        f" {here} tasks on this node; use srun --gpus-per-task, or set"
        " JAX_LOCAL_DEVICE_IDS for each task"
    )
  k = len(seen) // here
  return tuple(range(local * k, (local + 1) * k))


def _k8s_pid(env: Mapping[str, str]) -> tuple[str, int]:
  hint = "use completionMode: Indexed" + _SKIP_HINT
  index = _int_var(env, "JOB_COMPLETION_INDEX", hint)
  if "JAXLIB_JOB_INDEX" not in env:
    return "JOB_COMPLETION_INDEX", index
  hint = "map it from the pod label jobset.sigs.k8s.io/job-index"
  job = _int_var(env, "JAXLIB_JOB_INDEX", hint)
  hint = "with JAXLIB_JOB_INDEX set it to the Job's parallelism"
  per_job = _int_var(env, "JAXLIB_PODS_PER_JOB", hint, minimum=1)
  if index >= per_job:
    raise ValueError(
        f"JOB_COMPLETION_INDEX={index} must be < JAXLIB_PODS_PER_JOB="
        f"{per_job}; set JAXLIB_PODS_PER_JOB to the Job's parallelism"
    )
  return "JAXLIB_JOB_INDEX*JAXLIB_PODS_PER_JOB+JOB_COMPLETION_INDEX", (
      job * per_job + index
  )


def _detect(env: Mapping[str, str]) -> str | None:
  if "SLURM_PROCID" in env:
    if "SLURM_JOB_ID" not in env:
      raise ValueError(
          "SLURM_PROCID is set but SLURM_JOB_ID is not: a partial Slurm"
          " environment; run under srun, or unset SLURM_PROCID"
      )
    return "slurm"
  if "SLURM_JOB_ID" in env:
    logger.info(
        "SLURM_JOB_ID is set but this is not an srun task (no SLURM_PROCID);"
        " running single-process"
    )
  if "JOB_COMPLETION_INDEX" in env:
    return "kubernetes"
  return None


def resolve_cluster(
    env: Mapping[str, str] | None = None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    port: int | None = None,
) -> ClusterSpec:
  """Works out this process's place in the job; contacts nobody.

  See the module docstring for the order of sources and the variables read.

  Args:
    env: environment to read; defaults to `os.environ`.
    coordinator_address: "host:port" (or "host", then `port` is added).
    num_processes: number of processes in the job.
    process_id: this process's index.
    local_device_ids: device ordinals this process drives.
    port: coordinator port when the address has none; default
      JAX_COORDINATOR_PORT, else 8476.

  Returns:
    The ClusterSpec; source "explicit" when all of coordinator, count and id
    are given as arguments.

  Raises:
    ValueError: partial, non-integer or inconsistent settings; the message
      names the variable and what to set.
  """
  env = os.environ if env is None else env
  if port is None:
    port = DEFAULT_PORT
    if "JAX_COORDINATOR_PORT" in env:
      port = _int_var(
          env, "JAX_COORDINATOR_PORT", "set a free TCP port", minimum=1
      )
  if None not in (coordinator_address, num_processes, process_id):
    scheduler, source = None, "explicit"
  else:
    scheduler = _detect(env)
    source = scheduler or "explicit"
  fix_hint = {
      "slurm": "srun sets both; do not override them by hand",
      "kubernetes": "set JAXLIB_NUM_PROCESSES to replicas x parallelism"
      + _SKIP_HINT,
  }.get(scheduler, "fix one of them")

  # Process count.
  if num_processes is not None:
    num_from, num = "num_processes", int(num_processes)
  elif found := _explicit_env(env, _NUM_VARS):
    num_from = found[0]
    num = _int_var(env, found[0], "set the number of processes", minimum=1)
  elif scheduler == "slurm":
    num_from, num = _slurm_num(env)
  elif scheduler == "kubernetes":
    raise ValueError(
        "JAXLIB_NUM_PROCESSES is not set; in the pod spec set it to the total"
        " number of pods (replicas x parallelism)" + _SKIP_HINT
    )
  elif (
      coordinator_address is not None
      or process_id is not None
      or _explicit_env(env, _COORDINATOR_VARS)
      or _explicit_env(env, _PID_VARS)
  ):
    raise ValueError(
        "JAXLIB_NUM_PROCESSES (or the num_processes argument) is not set; a"
        " multi-process launch needs the coordinator, the process count and"
        " the process id"
    )
  else:
    return ClusterSpec(None, 1, 0, _local_ids(env, local_device_ids), "single")

  # Process id.
  if process_id is not None:
    pid_from, pid = "process_id", int(process_id)
  elif found := _explicit_env(env, _PID_VARS):
    pid_from, pid = found[0], _int_var(env, found[0], "set this process's id")
  elif scheduler == "slurm":
    pid_from, pid = "SLURM_PROCID", _int_var(env, "SLURM_PROCID", _BY_SRUN)
  elif scheduler == "kubernetes":
    pid_from, pid = _k8s_pid(env)
  elif num == 1:
    pid_from, pid = "default", 0
  else:
    hint = " (use an indexed Job)" if "KUBERNETES_SERVICE_HOST" in env else ""
    raise ValueError(
        f"JAXLIB_PROCESS_ID (or the process_id argument) is not set{hint};"
        f" {num_from}={num} needs one id per process in [0, {num})"
    )
  if not 0 <= pid < num:
    raise ValueError(
        f"{pid_from}={pid} must be < {num_from}={num} (ids run from 0 to"
        f" {num - 1}); {fix_hint}"
    )

  # Coordinator.
  coordinator = None
  if coordinator_address is not None:
    coordinator = _with_port(coordinator_address, port, "coordinator_address")
  elif found := _explicit_env(env, _COORDINATOR_VARS):
    coordinator = _with_port(found[1], port, found[0])
  elif num > 1 and scheduler == "slurm":
    coordinator = _slurm_coordinator(env, port, num, pid)
  elif num > 1:
    what = " to process 0's host:port"
    if scheduler == "kubernetes":
      what = (
          " to the DNS name of pod 0, <jobset>-<replicatedjob>-0-0.<subdomain>"
      )
    raise ValueError(f"JAXLIB_COORDINATOR is not set; set it{what}")

  # Local devices.
  if (
      local_device_ids is None
      and not env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
      and scheduler == "slurm"
  ):
    local_device_ids = _slurm_local_devices(env, num)
  return ClusterSpec(
      coordinator, num, pid, _local_ids(env, local_device_ids), source
  )


def _local_ids(
    env: Mapping[str, str], ids: Sequence[int] | None
) -> tuple[int, ...] | None:
  if ids is not None:
    return tuple(int(i) for i in ids)
  var = "JAX_LOCAL_DEVICE_IDS"
  return _parse_device_ids(env[var], var) if env.get(var, "").strip() else None


# --------------------------------------------------------------------------
# Initialisation.

_ACTIVE: ClusterSpec | None = None  # Set by the first `initialize` call.


def _backend_initialized() -> bool:
  """Whether XLA backends exist (then XLA_FLAGS and distributed are fixed)."""
  try:
    from jax._src import xla_bridge  # noqa: PLC0415

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    warnings.warn(
        "cannot tell whether JAX's backend is initialised (private API"
        " jax._src.xla_bridge.backends_are_initialized is gone); XLA_FLAGS"
        " set after the first JAX computation are silently ignored",
        stacklevel=3,
    )
    return False


def _skip_requested(env: Mapping[str, str]) -> bool:
  value = env.get("JAXLIB_DISTRIBUTED", "").strip().lower()
  return value in ("0", "false", "no", "off")


def initialize(
    spec: ClusterSpec | None = None,
    *,
    env: Mapping[str, str] | None = None,
    distributed_kwargs: Mapping[str, Any] | None = None,
    **resolve_kwargs,
) -> ClusterSpec:
  """Joins the multi-process job described by `spec` or the environment.

  Call once per process at the top of `main`, before any JAX computation.
  A single-process spec does nothing. Later calls return the first result
  without doing anything. JAXLIB_DISTRIBUTED=0 skips resolution and returns
  a single-process spec. JAX's own cluster auto-detection is switched off
  (`cluster_detection_method="deactivate"`): under Slurm it would pin every
  process to one GPU ([SLURM_LOCALID]) even with one process per node.

  Args:
    spec: the cluster; default `resolve_cluster(env, **resolve_kwargs)`.
    env: environment to read; defaults to `os.environ`.
    distributed_kwargs: extra arguments of `jax.distributed.initialize`,
      e.g. {"heartbeat_timeout_seconds": 300, "initialization_timeout": 600}.
    **resolve_kwargs: arguments of `resolve_cluster` (coordinator_address,
      num_processes, process_id, local_device_ids, port).

  Returns:
    The ClusterSpec in effect for this process.

  Raises:
    ValueError: from `resolve_cluster`.
    RuntimeError: a multi-process spec after JAX's backend has started.
  """
  global _ACTIVE
  if spec is not None and resolve_kwargs:
    raise TypeError(
        "pass either spec or resolve_cluster arguments, not both: got"
        f" {sorted(resolve_kwargs)}"
    )
  if _ACTIVE is not None:
    if spec is not None and spec != _ACTIVE:
      logger.warning(
          "launch.initialize already ran with %s; ignoring %s", _ACTIVE, spec
      )
    return _ACTIVE
  env = os.environ if env is None else env
  if _skip_requested(env):
    logger.info("JAXLIB_DISTRIBUTED=0: running as a single process")
    _ACTIVE = ClusterSpec(None, 1, 0, None, "single")
    return _ACTIVE
  if spec is None:
    spec = resolve_cluster(env, **resolve_kwargs)
  if not spec.is_multiprocess:
    logger.info("single process (%s); jax.distributed not started", spec.source)
  elif jax.distributed.is_initialized():
    logger.warning(
        "jax.distributed was already initialised elsewhere; using it as is"
    )
  else:
    if _backend_initialized():
      raise RuntimeError(
          "launch.initialize() must run before any JAX computation"
          " (jax.devices(), creating arrays, jit): the backend has already"
          " started. Call it first thing in main."
      )
    logger.info(
        "process %d of %d (%s) joining coordinator %s; local devices %s",
        spec.process_id,
        spec.num_processes,
        spec.source,
        spec.coordinator_address,
        "all" if spec.local_device_ids is None else list(spec.local_device_ids),
    )
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=(
            None
            if spec.local_device_ids is None
            else list(spec.local_device_ids)
        ),
        cluster_detection_method="deactivate",
        **dict(distributed_kwargs or {}),
    )
  _ACTIVE = spec
  return spec


def is_primary() -> bool:
  """True on process 0: log, write metrics and reports only there."""
  return jax.process_index() == 0


# --------------------------------------------------------------------------
# XLA flags.


def xla_flags_preset(name: str) -> str:
  """The XLA_FLAGS string of a named preset.

  Args:
    name: "h100" (latency-hiding scheduler, pipelined and combined
      collectives), "h100_tp" (plus collective matmul for tensor
      parallelism) or "cpu_sim:N" (N simulated CPU devices).

  Returns:
    Space-separated flags.

  Raises:
    ValueError: an unknown preset or a bad N; the message lists the presets.
  """
  if name in PRESETS:
    return " ".join(PRESETS[name])
  if name.startswith(_CPU_SIM):
    count = name[len(_CPU_SIM) :]
    if count.isdigit() and int(count) >= 1:
      return f"--xla_force_host_platform_device_count={int(count)}"
  raise ValueError(
      f"unknown XLA flag preset {name!r}; presets: {sorted(PRESETS)} and"
      " 'cpu_sim:N' with N >= 1"
  )


def apply_xla_flags(name: str) -> None:
  """Appends a preset to os.environ["XLA_FLAGS"].

  A flag already present in XLA_FLAGS (same name) keeps its value; the
  preset's copy is dropped with a warning.

  Args:
    name: a preset name, see `xla_flags_preset`.

  Raises:
    ValueError: an unknown preset.
    RuntimeError: JAX's backend is already initialised, so XLA would never
      read the flags (checked with jax._src.xla_bridge; if that private API
      disappears, a warning is issued instead).
  """
  flags = xla_flags_preset(name).split()
  if _backend_initialized():
    raise RuntimeError(
        f"apply_xla_flags({name!r}): JAX's backend is already initialised and"
        " XLA has read XLA_FLAGS; call it before the first JAX computation,"
        " or export the flags in the launch script"
    )
  current = os.environ.get("XLA_FLAGS", "").split()
  present = {f.split("=", 1)[0] for f in current}
  kept = [f for f in flags if f.split("=", 1)[0] in present]
  if kept:
    logger.warning("XLA_FLAGS already sets %s; keeping those values", kept)
  added = [f for f in flags if f.split("=", 1)[0] not in present]
  os.environ["XLA_FLAGS"] = " ".join(current + added)


# --------------------------------------------------------------------------
# Command line.

_EPILOG = """\
environment (first match wins; arguments above win over all):
  JAXLIB_COORDINATOR    host[:port] of process 0 (alias JAX_COORDINATOR_ADDRESS)
  JAXLIB_NUM_PROCESSES  number of processes (alias JAX_NUM_PROCESSES)
  JAXLIB_PROCESS_ID     this process's id (alias JAX_PROCESS_ID)
  Slurm (inside srun)   SLURM_NTASKS, SLURM_PROCID, SLURM_STEP_NODELIST,
                        SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE, SLURM_NODEID
  Kubernetes            JOB_COMPLETION_INDEX (+ JAXLIB_JOB_INDEX x
                        JAXLIB_PODS_PER_JOB for several replicated Jobs)
  JAX_COORDINATOR_PORT  port when the coordinator has none (default 8476)
  JAX_LOCAL_DEVICE_IDS  device ordinals of this process, e.g. 0,1,2,3
  JAXLIB_DISTRIBUTED=0  initialize() skips everything: one process

examples:
  srun --label python -m jaxlib_models.parallel.launch --print
  export XLA_FLAGS="$XLA_FLAGS $(python -m jaxlib_models.parallel.launch \\
      --xla-flags=h100)"
"""


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m jaxlib_models.parallel.launch`; returns the exit code."""
  parser = argparse.ArgumentParser(
      prog="python -m jaxlib_models.parallel.launch",
      description=(
          "Dry-run the multi-host launch: print the cluster this process"
          " would join (resolved from Slurm, Kubernetes or explicit settings;"
          " nothing is contacted), or print an XLA flag preset."
      ),
      epilog=_EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
      "--print",
      action="store_true",
      dest="print_spec",
      help="print the resolved ClusterSpec as one JSON line",
  )
  parser.add_argument(
      "--xla-flags",
      metavar="PRESET",
      help=(
          f"print the XLA_FLAGS of a preset: {', '.join(sorted(PRESETS))},"
          " cpu_sim:N"
      ),
  )
  parser.add_argument("--coordinator-address", help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, help="process count")
  parser.add_argument("--process-id", type=int, help="this process's id")
  parser.add_argument(
      "--port", type=int, help="coordinator port if the address has none"
  )
  args = parser.parse_args(argv)
  if not args.print_spec and not args.xla_flags:
    parser.error("nothing to do: pass --print and/or --xla-flags=PRESET")
  try:
    if args.xla_flags:
      print(xla_flags_preset(args.xla_flags))
    if args.print_spec:
      spec = resolve_cluster(
          coordinator_address=args.coordinator_address,
          num_processes=args.num_processes,
          process_id=args.process_id,
          port=args.port,
      )
      print(spec.to_json())
  except ValueError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
