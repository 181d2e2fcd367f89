"""What a compiled program needs and what bounds its speed, read from the compiler.

`compile_program` lowers and compiles one program (qtx.aot.programs) and returns its record:
the memory the TPU compiler plans per chip (`memory_analysis()`), its cost model's FLOPs and
HBM bytes per chip (`cost_analysis()`, which counts a while loop's body once: they are scaled
by the loops' trip counts as the compiled module's text gives them, and the FLOPs are at least
the model's), the collectives of the compiled module by kind
(qtx.aot.hlo), and a roofline:

    compute_s = flops / peak bf16 FLOP/s      memory_s = bytes_accessed / HBM bandwidth
    ici_s     = bytes each chip sends in collectives / ICI bandwidth (qtx.chips)
    roofline_s = max of the three;  bound = which one;  roofline_mfu = model FLOPs per chip /
    (peak x roofline_s)

The roofline is the cost model's lower bound on the step time, not a measured speed: it assumes
every op runs at the chip's peak and that nothing overlaps worse than perfectly. A program the
compiler refuses for memory (RESOURCE_EXHAUSTED) gets fits=False and the compiler's message.
"""
from __future__ import annotations

import re
import time
import warnings
from typing import Optional

from qtx import chips as chips_lib
from qtx.aot import hlo

# a program fits when its planned memory stays below this fraction of the chip's HBM
DEFAULT_HEADROOM = 0.1
KEYS = ("program", "topology", "device_kind", "chips", "hosts", "per_chip_batch", "microbatches",
        "hbm_bytes", "argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "used_bytes",
        "fits", "flops", "model_flops", "bytes_accessed", "collective_bytes", "compute_s",
        "memory_s", "ici_s", "roofline_s", "roofline_mfu", "bound", "compile_s", "error",
        "compiler_flops", "compiler_bytes_accessed", "loop_scale", "cost_incomplete",
        "bytes_by_part")


def _cost(compiled) -> dict:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - backends differ in what they support
    return {}
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return dict(ca or {})


def memory(compiled) -> dict:
  """Planned bytes per device: arguments, temporaries, outputs, outputs aliasing (donated)
  arguments, and their peak sum used_bytes = arguments + temporaries + outputs - aliased +
  the program's code."""
  m = compiled.memory_analysis()
  arg, temp = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
  out, alias = int(m.output_size_in_bytes), int(m.alias_size_in_bytes)
  code = int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
  return {"argument_bytes": arg, "temp_bytes": temp, "output_bytes": out, "alias_bytes": alias,
          "used_bytes": arg + temp + out - alias + code}


def roofline(flops: float, bytes_accessed: float, wire_bytes: float, chip: chips_lib.Chip,
             model_flops: Optional[float]) -> dict:
  """compute_s, memory_s, ici_s, roofline_s, bound and roofline_mfu (module docstring);
  model_flops is per chip (the compiler's flops when None)."""
  compute_s = flops / chip.bf16_flops
  memory_s = bytes_accessed / chip.hbm_bw
  ici_s = wire_bytes / chip.ici_bw if chip.ici_bw else 0.0
  times = {"compute": compute_s, "memory": memory_s, "ici": ici_s}
  bound = max(times, key=times.get)
  total = times[bound]
  useful = flops if model_flops is None else model_flops
  mfu = useful / (chip.bf16_flops * total) if total > 0 else None
  return {"compute_s": compute_s, "memory_s": memory_s,
          "ici_s": ici_s if chip.ici_bw else None, "roofline_s": total, "roofline_mfu": mfu,
          "bound": bound}


_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED|exceeds available HBM|Ran out of memory", re.I)


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  m = re.search(r"(RESOURCE_EXHAUSTED:[^\n]*|[^\n]*exceeds available HBM[^\n]*)", text)
  return (m.group(1) if m else text.splitlines()[0] if text else type(e).__name__)[:400]


def compile_program(program, devices, *, topology: str = "", hosts: int = 1,
                    microbatches: int = 1, headroom: float = DEFAULT_HEADROOM,
                    chip: Optional[chips_lib.Chip] = None, keep_text: bool = False) -> dict:
  """Lower + compile `program` for `devices` and return its record (KEYS; with keep_text the
  compiled module's text under 'hlo_text'). Raises on errors other than running out of
  memory."""
  dev = devices[0]
  chip = chip or chips_lib.of_device(dev)
  n = len(devices)
  rec = {k: None for k in KEYS}
  rec.update(program=program.name, topology=topology, device_kind=dev.device_kind, chips=n,
             hosts=hosts, per_chip_batch=program.batch / n, microbatches=microbatches,
             hbm_bytes=chip.hbm_bytes if chip else None)
  if rec["per_chip_batch"] == int(rec["per_chip_batch"]):
    rec["per_chip_batch"] = int(rec["per_chip_batch"])
  t0 = time.perf_counter()
  try:
    with warnings.catch_warnings():
      # a persistent compilation cache cannot hand back programs of compile-only devices
      warnings.filterwarnings("ignore", message=".*persistent compilation cache.*")
      options = None
      if dev.platform == "gpu":
        # without a GPU the Triton GEMM fusions cannot be tiled from the target description:
        # cuBLAS GEMMs (the same memory plan for the buffers around them)
        options = {"xla_gpu_enable_triton_gemm": False}
      compiled = program.fn.lower(*program.args).compile(compiler_options=options)
  except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory refusal is a result
    if not _EXHAUSTED.search(str(e)):
      raise
    rec.update(fits=False, error=_first_line(e), compile_s=time.perf_counter() - t0)
    return rec
  rec["compile_s"] = time.perf_counter() - t0
  rec.update(analyse(compiled, n, program.model_flops, chip, headroom, keep_text))
  return rec


def analyse(compiled, n_devices: int, model_flops: Optional[float] = None,
            chip: Optional[chips_lib.Chip] = None, headroom: float = DEFAULT_HEADROOM,
            keep_text: bool = False) -> dict:
  """The record's figures (memory, cost, collectives, roofline) of a compiled program, on
  compile-only or real devices (benchmarks.device_check prints them beside a measured step).
  model_flops: analytic FLOPs of one execution on all n_devices together."""
  rec = {}
  n = n_devices
  rec.update(memory(compiled))
  cost = _cost(compiled)
  text = compiled.as_text()
  module = hlo.parse(text)
  # XLA's cost analysis counts a while loop's body once (the microbatch loops of a step with
  # train.microbatches > 1): scale by the trip counts (hlo.loop_scale); the FLOPs are at least
  # the model's
  rec["compiler_flops"] = float(cost.get("flops", 0.0))
  rec["compiler_bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
  rec["loop_scale"] = hlo.loop_scale(module)
  rec["bytes_accessed"] = rec["compiler_bytes_accessed"] * rec["loop_scale"]
  model_per_chip = model_flops / n if model_flops else 0.0
  rec["flops"] = max(rec["compiler_flops"] * rec["loop_scale"], model_per_chip)
  # fewer FLOPs than the model needs: loops the trip-count scaling did not find (the HBM bytes
  # are undercounted as well, so the roofline is not a bound then)
  rec["cost_incomplete"] = (not cost) or (
      rec["compiler_flops"] * rec["loop_scale"] < 0.9 * model_per_chip)
  if not cost:  # the GPU compiler gives no cost analysis for a program it compiled deviceless
    rec["bytes_accessed"] = rec["compiler_bytes_accessed"] = None
  coll = hlo.collectives(module, n)
  # where the HBM traffic goes: the top-level ops' bytes by tower, part and direction
  rec["bytes_by_part"] = dict(sorted(hlo.bytes_by_part(module).items(), key=lambda kv: -kv[1]))
  rec["collective_bytes"] = {k: v["bytes"] for k, v in sorted(coll.items())}
  wire = sum(v["wire_bytes"] for v in coll.values())
  rec["model_flops"] = model_per_chip or None
  if chip is not None:
    budget = (1.0 - headroom) * chip.hbm_bytes
    rec["fits"] = rec["used_bytes"] <= budget
    if rec["bytes_accessed"] is not None:
      rec.update(roofline(rec["flops"], rec["bytes_accessed"], wire, chip, rec["model_flops"]))
  if keep_text:
    rec["hlo_text"] = text
  return rec


# ----------------------------------------------------------------------------- presentation

def _gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f}"


def _num(x, unit: float, digits: int, suffix: str = "") -> str:
  return "-" if x is None else f"{x / unit:.{digits}f}{suffix}"


def _ms(s) -> str:
  return "-" if s is None else f"{1e3 * s:.1f}"


def markdown(records: list[dict]) -> str:
  """A markdown table of compile records (figures per chip; estimates from the cost model)."""
  head = ("| program | topology | chips (hosts) | batch/chip | microbatches | HBM GiB used / "
          "capacity | fits | TFLOP/chip | HBM GB/chip | collective GB/chip | roofline ms | bound "
          "| roofline MFU | compile s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in records:
    coll = sum((r.get("collective_bytes") or {}).values()) if r.get("collective_bytes") else None
    cells = [r["program"], r["topology"], f"{r['chips']} ({r['hosts']})", r["per_chip_batch"],
             r["microbatches"], f"{_gib(r.get('used_bytes'))} / {_gib(r.get('hbm_bytes'))}",
             "yes" if r.get("fits") else "no", _num(r.get("flops"), 1e12, 2),
             _num(r.get("bytes_accessed"), 1e9, 1), _num(coll, 1e9, 2), _ms(r.get("roofline_s")),
             (r.get("bound") or "-") + (" (loops counted once)" if r.get("cost_incomplete")
                                        else ""),
             "-" if r.get("cost_incomplete") else _num(r.get("roofline_mfu"), 0.01, 1, "%"),
             _num(r.get("compile_s"), 1, 1)]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


def summary(records: list[dict]) -> str:
  """One line: the first program's fit, memory, roofline and bound."""
  parts = []
  for r in records:
    if r.get("error"):
      parts.append(f"{r['program']}: does not fit ({r['error'][:120]})")
      continue
    mfu = r.get("roofline_mfu")
    if r.get("cost_incomplete"):
      parts.append(f"{r['program']}: {'fits' if r.get('fits') else 'DOES NOT FIT'} "
                   f"{_gib(r.get('used_bytes'))}/{_gib(r.get('hbm_bytes'))} GiB, batch/chip "
                   f"{r['per_chip_batch']} x{r['microbatches']} mb; "
                   + ("no cost analysis from this compiler" if r.get("bytes_accessed") is None
                      else "the cost model counted its loops once") + ": no roofline")
      continue
    parts.append(
        f"{r['program']}: {'fits' if r.get('fits') else 'DOES NOT FIT'} "
        f"{_gib(r.get('used_bytes'))}/{_gib(r.get('hbm_bytes'))} GiB, batch/chip "
        f"{r['per_chip_batch']} x{r['microbatches']} mb, roofline {_ms(r.get('roofline_s'))} ms "
        f"{r.get('bound')}-bound" + ("" if mfu is None else f" (MFU <= {100 * mfu:.1f}%)"))
  topo = records[0]["topology"] if records else ""
  return f"qtx compile {topo}: " + "; ".join(parts) + " [compiler cost model, estimates]"

