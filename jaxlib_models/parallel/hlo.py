"""Collectives in lowered StableHLO text, and their bytes on the wire.

`collectives(jax.jit(f).lower(*args).as_text())` lists every all-reduce,
all-gather, reduce-scatter, all-to-all and collective-permute of a program
with its operand shape, element type and group size, so tests can compare a
program's communication with an analytic model. Parse the *lowered* text:
XLA:CPU upcasts bf16 all-reduces to f32 in the compiled HLO, the lowered
StableHLO keeps the dtype the program asked for.

Ring model, per device, for an operand of S bytes in a group of n devices:
all-reduce 2(n-1)/n S; all-gather (n-1) S (S is the per-device piece);
reduce-scatter and all-to-all (n-1)/n S; collective-permute S.
"""

import dataclasses
import math
import re
from typing import Any

import numpy as np

KINDS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "collective_permute",
)

_OP_RE = re.compile(r'"stablehlo\.(' + "|".join(KINDS) + r')"\(')
_GROUPS_RE = re.compile(
    r"(?:replica_groups|source_target_pairs)\s*=\s*dense<.*?>\s*:\s*"
    r"tensor<(?:(\d+)x(\d+)x)?i64>")
_TENSOR_RE = re.compile(r"tensor<([^<>]*)>")
_FUNC_RE = re.compile(r"func\.func\s+(?:public\s+|private\s+)?@([\w.$-]+)\(")
_CALL_RE = re.compile(r"call\s+@([\w.$-]+)\(")
_WHILE_DO_RE = re.compile(r"\}\s*do\s*\{")
_BRANCH_RE = re.compile(r'"stablehlo\.(?:case|if)"\(')
_BODY_RE = re.compile(r"\{[ \t]*\n")
_PARTITIONS_RE = re.compile(r"mhlo\.num_partitions\s*=\s*(\d+)")

_NUMPY_TO_HLO = {
    "float32": "f32",
    "float64": "f64",
    "float16": "f16",
    "bfloat16": "bf16",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "uint8": "ui8",
    "uint16": "ui16",
    "uint32": "ui32",
    "uint64": "ui64",
    "bool": "i1",
}


def dtype_name(dtype) -> str:
  """The StableHLO element type name of a NumPy/JAX dtype (f32, bf16, i8)."""
  name = np.dtype(dtype).name
  if name not in _NUMPY_TO_HLO:
    raise ValueError(f"no StableHLO name known for dtype {name}")
  return _NUMPY_TO_HLO[name]


def dtype_bytes(name: str) -> int:
  """Bytes per element of a StableHLO element type (i1 counts as 1 byte)."""
  m = re.match(r"[a-z]+(\d+)", name)
  if m is None:
    raise ValueError(f"unknown StableHLO element type {name!r}")
  return max(1, int(m.group(1)) // 8)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective: its operand and the group it runs over.

  Attributes:
    kind: one of `KINDS`.
    shape: operand shape on one device (for all-gather the local piece).
    dtype: StableHLO element type name ("f32", "bf16", "i8", "i32").
    group_size: devices in each replica group.
    in_loop: whether the op sits in a while (scan) body, directly or through a
      called function; not part of equality.
    in_branch: whether the op sits in a branch of a case/if (`lax.cond`,
      `lax.switch`), directly or through a called function; not part of
      equality.
  """

  kind: str
  shape: tuple[int, ...]
  dtype: str
  group_size: int
  in_loop: bool = dataclasses.field(default=False, compare=False)
  in_branch: bool = dataclasses.field(default=False, compare=False)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r}: choose one of {KINDS}")
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

  @property
  def operand_bytes(self) -> int:
    return math.prod(self.shape) * dtype_bytes(self.dtype)

  @property
  def bytes_on_wire(self) -> float:
    """Bytes one device sends for this op under the ring model."""
    s, n = self.operand_bytes, self.group_size
    if n <= 1:
      return 0.0
    if self.kind == "all_reduce":
      return 2 * (n - 1) / n * s
    if self.kind == "all_gather":
      return float((n - 1) * s)
    if self.kind in ("reduce_scatter", "all_to_all"):
      return (n - 1) / n * s
    return float(s)  # collective_permute

  def sort_key(self):
    return (self.kind, self.dtype, self.shape, self.group_size)


def total_bytes(colls) -> int:
  """Sum of `bytes_on_wire`, rounded to whole bytes."""
  return round(sum(c.bytes_on_wire for c in colls))


def _match(text: str, i: int, open_ch: str, close_ch: str) -> int:
  """Index just past the bracket that closes the one at `text[i]`."""
  depth = 0
  for j in range(i, len(text)):
    c = text[j]
    if c == open_ch:
      depth += 1
    elif c == close_ch:
      depth -= 1
      if depth == 0:
        return j + 1
  raise ValueError(f"unbalanced {open_ch}{close_ch} at offset {i}")


def _split_top(s: str) -> list[str]:
  """Splits `s` on commas that are not inside <> or ()."""
  out, depth, start = [], 0, 0
  for j, c in enumerate(s):
    if c in "<(":
      depth += 1
    elif c in ">)":
      depth -= 1
    elif c == "," and depth == 0:
      out.append(s[start:j])
      start = j + 1
  out.append(s[start:])
  return [p.strip() for p in out if p.strip()]


def _tensor_type(t: str) -> tuple[tuple[int, ...], str]:
  m = _TENSOR_RE.fullmatch(t.strip())
  if m is None:
    raise ValueError(f"not a ranked tensor type: {t!r}")
  *dims, dtype = m.group(1).split("x")
  return tuple(int(d) for d in dims), dtype


def _loop_spans(text: str) -> list[tuple[int, int]]:
  """Character ranges of every while-loop body (`do { ... }`)."""
  spans = []
  for m in _WHILE_DO_RE.finditer(text):
    start = m.end() - 1
    spans.append((start, _match(text, start, "{", "}")))
  return spans


def _branch_spans(text: str) -> list[tuple[int, int]]:
  """Character ranges of the branch regions of every case / if op."""
  spans = []
  for m in _BRANCH_RE.finditer(text):
    j = _match(text, m.end() - 1, "(", ")")
    start = text.index("(", j)
    spans.append((start, _match(text, start, "(", ")")))
  return spans


def _reached(text: str, spans, funcs) -> tuple[set[str], Any]:
  """Functions called from inside `spans`, transitively; and a predicate
  telling whether an offset lies in a span or in such a function."""

  def func_at(i):
    for name, a, b in funcs:
      if a <= i < b:
        return name
    return None

  reached: set[str] = set()
  changed = True
  while changed:
    changed = False
    for m in _CALL_RE.finditer(text):
      callee = m.group(1)
      if callee in reached:
        continue
      if any(a <= m.start() < b for a, b in spans) or (
          func_at(m.start()) in reached):
        reached.add(callee)
        changed = True

  def inside(i):
    return any(a <= i < b for a, b in spans) or func_at(i) in reached

  return reached, inside


def _functions(text: str) -> list[tuple[str, int, int]]:
  """(name, start, end) of every func.func body."""
  out = []
  for m in _FUNC_RE.finditer(text):
    # The body's brace ends its line; result attributes ({jax.result_info =
    # ...}) share the signature's line.
    body = _BODY_RE.search(text, _match(text, m.end() - 1, "(", ")")).start()
    out.append((m.group(1), m.start(), _match(text, body, "{", "}")))
  return out


def collectives(text: str) -> list[Collective]:
  """Every collective in lowered StableHLO text, in program order.

  Args:
    text: `jax.jit(f).lower(...).as_text()` (StableHLO, generic op syntax as
      JAX prints it). A variadic op gives one entry per operand.

  Returns:
    One `Collective` per operand. The group size comes from the op's
    `replica_groups` type `tensor<GxSxi64>` (S devices per group); an empty
    group list means all partitions of the module. For collective-permute it
    is the number of source-target pairs.
  """
  funcs = _functions(text)
  _, in_loop = _reached(text, _loop_spans(text), funcs)
  _, in_branch = _reached(text, _branch_spans(text), funcs)

  m = _PARTITIONS_RE.search(text)
  partitions = int(m.group(1)) if m else 1
  out = []
  for op in _OP_RE.finditer(text):
    kind = op.group(1)
    j = _match(text, op.end() - 1, "(", ")")
    rest = text[j:].lstrip()
    j = len(text) - len(rest)
    if rest.startswith("<{"):
      attrs_end = _match(text, j + 1, "{", "}") + 1
      attrs = text[j:attrs_end]
      j = attrs_end
    else:
      attrs = ""
    rest = text[j:].lstrip()
    j = len(text) - len(rest)
    if rest.startswith("({"):  # reduction body of all_reduce/reduce_scatter
      j = _match(text, j, "(", ")")
    sig = re.compile(r"\s*:\s*\(").match(text, j)
    if sig is None:
      raise ValueError(f"no type signature after {kind} at offset {op.start()}")
    k = _match(text, sig.end() - 1, "(", ")")
    operand_types = _split_top(text[sig.end():k - 1])
    g = _GROUPS_RE.search(attrs)
    if g is None or g.group(2) is None:
      group = partitions
    elif kind == "collective_permute":
      group = int(g.group(1))
    else:
      group = int(g.group(2)) or partitions
    loop, branch = in_loop(op.start()), in_branch(op.start())
    for t in operand_types:
      shape, dtype = _tensor_type(t)
      out.append(Collective(kind, shape, dtype, group, in_loop=loop,
                            in_branch=branch))
  return out


def wire_bytes(text: str) -> int:
  """Bytes per device per call of the lowered program (ring model)."""
  return total_bytes(collectives(text))
