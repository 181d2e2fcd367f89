"""Reading a compiled HLO module's text: instructions, how often each runs, collectives, and a
per-op account of HBM bytes grouped by the model's parts.

The compiler's `cost_analysis()` gives one total of FLOPs and bytes per program; this module
splits the program up. Each computation runs as often as its callers do, times the trip count
of a while loop whose body it is (the compiler writes `known_trip_count` in the loop's
backend_config; a loop without one counts once). (The compiled TPU module writes no
`known_trip_count`; the count is then read from the loop's condition and step.) Top-level ops
(not the inside of a fusion)
read their operands and write their result: that is the HBM traffic this module attributes to
an op, the same convention as XLA's "bytes accessed" (it ignores what stays in on-chip memory
inside a fusion). It is an account of the compiled program, not a measurement.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Optional

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
# ops that move no data of their own (views, tuples, control flow whose bodies are counted)
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
         "add-dependency", "domain"}

_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")


def array_bytes(text: str) -> float:
  """Bytes of every array shape written in `text` (a shape or a tuple of shapes)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * DTYPE_BYTES[dtype]
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """'(f32[2], s32[]) all-gather-start(...), ...' -> (shape text, the text after it)."""
  rest = rest.strip()
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:]
  i = rest.find(" ")
  return (rest, "") if i < 0 else (rest[:i], rest[i:])


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  shape: str  # result shape text
  operands: list[str]
  calls: list[str]  # computations it calls
  body: Optional[str]  # a while loop's body
  trip_count: Optional[int]  # a while loop's known_trip_count, or inferred (Module.__post_init__)
  op_name: str  # JAX name scope ('' where XLA made the op)
  text: str
  condition: Optional[str] = None  # a while loop's condition
  root: bool = False

  @property
  def result_bytes(self) -> float:
    return array_bytes(self.shape)


def _parse_instr(name: str, rest: str) -> Instr:
  shape, after = _split_shape(rest)
  m = re.match(r"\s*([\w\-]+)\(", after)
  opcode = m.group(1) if m else ""
  args = ""
  if m:
    depth, start = 0, m.end() - 1
    for i in range(start, len(after)):
      depth += after[i] == "("
      depth -= after[i] == ")"
      if depth == 0:
        args = after[start + 1:i]
        break
  operands = re.findall(r"%([\w.\-]+)", args)
  calls = []
  for key in ("calls", "to_apply", "condition", "body"):
    for cm in re.finditer(rf"\b{key}=%([\w.\-]+)", after):
      calls.append(cm.group(1))
  for cm in re.finditer(r"branch_computations=\{([^}]*)\}", after):
    calls += re.findall(r"%([\w.\-]+)", cm.group(1))
  body = re.search(r"\bbody=%([\w.\-]+)", after)
  trip = re.search(r'known_trip_count[^0-9]*"n"\s*:\s*"?(\d+)', after)
  scope = re.search(r'op_name="([^"]*)"', after)
  cond = re.search(r"\bcondition=%([\w.\-]+)", after)
  return Instr(name, opcode, shape, operands, calls, body.group(1) if body else None,
               int(trip.group(1)) if trip else None, scope.group(1) if scope else "", rest,
               cond.group(1) if cond else None)


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instr]]
  entry: str
  fused: set[str]  # computations that are the inside of a fusion (or a reduction's combiner)

  def __post_init__(self):
    """Trip counts of while loops the compiler wrote none for (the compiled TPU module writes
    none): a condition `i < N` on a tuple element that starts at a constant M (else 0) and that
    the body steps by a constant S (else 1) runs ceil((N - M) / S) times."""
    for instrs in self.computations.values():
      local = {i.name: i for i in instrs}
      for ins in instrs:
        if ins.opcode == "while" and ins.trip_count is None and ins.condition and ins.body:
          ins.trip_count = _infer_trip_count(self, ins, local)

  def multiplicity(self) -> dict[str, float]:
    """How many times each computation runs per execution of the entry computation."""
    callers = collections.defaultdict(list)  # callee -> [(caller, factor)]
    for comp, instrs in self.computations.items():
      for ins in instrs:
        for c in ins.calls:
          factor = (ins.trip_count or 1) if (ins.opcode == "while" and c == ins.body) else 1
          callers[c].append((comp, factor))
    memo: dict[str, float] = {}

    def count(comp, stack=()):
      if comp == self.entry:
        return 1.0
      if comp in memo:
        return memo[comp]
      if comp in stack:
        return 0.0
      memo[comp] = sum(count(c, stack + (comp,)) * f for c, f in callers.get(comp, ()))
      return memo[comp]

    return {c: count(c) for c in self.computations}

  def instructions(self):
    """(instruction, computation, runs per execution) of every instruction."""
    mult = self.multiplicity()
    for comp, instrs in self.computations.items():
      for ins in instrs:
        yield ins, comp, mult[comp]


def _const(ins: Optional[Instr]) -> Optional[int]:
  if ins is None or ins.opcode != "constant":
    return None
  m = re.search(r"constant\((-?\d+)\)", ins.text)
  return int(m.group(1)) if m else None


def _tuple_index(ins: Optional[Instr]) -> Optional[int]:
  if ins is None or ins.opcode != "get-tuple-element":
    return None
  m = re.search(r"\bindex=(\d+)", ins.text)
  return int(m.group(1)) if m else None


def _infer_trip_count(module: "Module", loop: Instr, caller: dict) -> Optional[int]:
  cond = {i.name: i for i in module.computations.get(loop.condition, [])}
  body = {i.name: i for i in module.computations.get(loop.body, [])}
  root = next((i for i in cond.values() if i.root), None)
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  a, b = (cond.get(o) for o in root.operands)
  if "direction=LT" in root.text:
    counter, limit = a, _const(b)
  elif "direction=GT" in root.text:
    counter, limit = b, _const(a)
  else:
    return None
  k = _tuple_index(counter)
  if limit is None or k is None:
    return None
  init = 0
  start = caller.get(loop.operands[0]) if loop.operands else None
  if start is not None and start.opcode == "tuple" and k < len(start.operands):
    init = _const(caller.get(start.operands[k])) or 0
  step = 1
  broot = next((i for i in body.values() if i.root), None)
  if broot is not None and broot.opcode == "tuple" and k < len(broot.operands):
    nxt = body.get(broot.operands[k])
    if nxt is not None and nxt.opcode == "add" and len(nxt.operands) == 2:
      consts = [_const(body.get(o)) for o in nxt.operands]
      step = next((c for c in consts if c), 1)
  return max(0, -(-(limit - init) // step)) if step > 0 else None


def parse(text: str) -> Module:
  """The computations of an HLO module's text (compiled.as_text())."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    head = _HEAD.match(line) if not line[:1].isspace() else None
    if head:
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      ins = _parse_instr(m.group(2), m.group(3))
      ins.root = bool(m.group(1))
      comps[current].append(ins)
  fused = set()
  for instrs in comps.values():
    for ins in instrs:
      if ins.opcode not in ("while", "call", "conditional", "async-start"):
        fused.update(ins.calls)
      elif ins.opcode == "async-start":
        fused.update(ins.calls)
  return Module(comps, entry, fused)


def _group_size(text: str, default: int) -> int:
  """Participants of each group of a collective (its replica_groups), else `default`."""
  m = re.search(r"replica_groups=\{\{([^}]*)\}", text)
  if m:
    return len([x for x in m.group(1).split(",") if x.strip()])
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", text)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    names = re.findall(r"'([^']+)'", m.group(2))
    return math.prod(int(sizes.get(n, 1)) for n in names) or default
  return default


def _collective_kind(opcode: str) -> Optional[str]:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def _collective_payload(ins: Instr) -> float:
  """Bytes of a collective's result (for an async start op: its output buffer)."""
  if ins.opcode.endswith("-start") and ins.shape.startswith("("):
    arrays = _ARRAY.findall(ins.shape)
    if ins.opcode in ("all-gather-start", "collective-permute-start") and len(arrays) >= 2:
      dtype, dims = arrays[1]
      return (math.prod(int(d) for d in dims.split(",") if d) if dims else 1) * DTYPE_BYTES[dtype]
  return ins.result_bytes


def collectives(module: Module, devices: int) -> dict[str, dict]:
  """{kind: {'bytes': result bytes per execution, 'count': ops run, 'wire_bytes': bytes each
  device sends (ring algorithms: all-gather and all-to-all (n-1)/n of the result, all-reduce
  2(n-1)/n, reduce-scatter (n-1) x the result, a permute the result)}} per device."""
  out: dict[str, dict] = {}
  for ins, _, runs in module.instructions():
    kind = _collective_kind(ins.opcode)
    if kind is None or runs == 0:
      continue
    payload = _collective_payload(ins)
    n = max(_group_size(ins.text, devices), 1)
    wire = {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n, "ragged-all-to-all": (n - 1) / n,
            "all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1,
            "collective-permute": 1.0}[kind] * payload
    d = out.setdefault(kind, {"bytes": 0.0, "count": 0, "wire_bytes": 0.0})
    d["bytes"] += payload * runs
    d["count"] += int(runs)
    d["wire_bytes"] += wire * runs
  return out


def loop_scale(module: Module) -> float:
  """HBM bytes of the top-level ops counted with loop trip counts over the same counted once
  per loop body (1.0 for a module without counted loops). XLA's cost analysis counts a while
  loop's body once; compile mode multiplies its figures by this."""
  once = full = 0.0
  for _, b, runs in _op_bytes_runs(module):
    once += b
    full += b * runs
  return full / once if once else 1.0


def op_bytes(module: Module):
  """(instruction, HBM bytes per execution: operands read + result written, x runs) of every
  top-level op that moves data (module docstring)."""
  for ins, b, runs in _op_bytes_runs(module):
    yield ins, b * runs


def _op_bytes_runs(module: Module):
  """(instruction, bytes of one run, runs per execution) of every top-level op that moves
  data and runs."""
  shapes = {}
  for instrs in module.computations.values():
    for ins in instrs:
      shapes[ins.name] = ins.result_bytes
  for ins, comp, runs in module.instructions():
    if comp in module.fused or ins.opcode in _FREE or runs == 0 or ins.opcode.endswith("-done"):
      continue
    yield ins, sum(shapes.get(o, 0.0) for o in ins.operands) + ins.result_bytes, runs


# (substring of an op's name scope, part of the model) in the order they are tried
PARTS = (("/attn/", "attention"), ("/mlp/", "MLP"), ("/ln_", "LayerNorm"),
         ("patch_embed", "patch embedding"), ("/proj", "projection"))


def part_of(op_name: str) -> str:
  """'image attention bwd'-style label of an op from its JAX name scope: the tower (image /
  text, from the CLIP module's encode_image / encode_text), the part of the block, and the
  direction (autodiff's transpose scope is the backward pass, which includes a remat'ed
  forward's recomputation); ops outside the towers (the loss, its gradient, the optimizer) are
  one group, and ops XLA created without a name scope another."""
  if not op_name:
    return "XLA-created ops (no name scope)"
  tower = ("image" if "encode_image" in op_name else
           "text" if "encode_text" in op_name else None)
  if tower is None:
    return "loss, optimizer, other"
  part = next((label for key, label in PARTS if key in op_name), "embedding, pooling, other")
  return f"{tower} {part} {'bwd' if 'transpose(' in op_name else 'fwd'}"


def scope_of(module: Module) -> dict[str, str]:
  """{instruction: name scope}, where an op XLA created without one (a copy, a prefetch, a
  layout change) takes the scope of its first operand that has one."""
  own = {ins.name: ins for instrs in module.computations.values() for ins in instrs}
  out = {}
  for name, ins in own.items():
    scope, seen, cur = ins.op_name, 0, ins
    while not scope and cur.operands and seen < 8:
      cur = own.get(cur.operands[0])
      if cur is None:
        break
      scope, seen = cur.op_name, seen + 1
    out[name] = scope
  return out


def bytes_by_part(module: Module) -> dict[str, float]:
  """HBM bytes per execution (op_bytes) summed by part_of of each op's name scope (scope_of)."""
  scopes = scope_of(module)
  out: collections.Counter = collections.Counter()
  for ins, b in op_bytes(module):
    out[part_of(scopes.get(ins.name, ins.op_name))] += b
  return dict(out)


def bytes_by_opcode(module: Module) -> dict[str, float]:
  out: collections.Counter = collections.Counter()
  for ins, b in op_bytes(module):
    kind = ins.opcode
    if kind == "fusion":
      m = re.search(r"kind=(k\w+)", ins.text)
      kind = f"fusion {m.group(1)}" if m else kind
    out[kind] += b
  return dict(out)
