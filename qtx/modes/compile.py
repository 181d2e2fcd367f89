"""Compile mode: the config's programs compiled for a TPU topology on any host, shapes only.

  python -m qtx.main --config configs/clip_b16.py --workdir DIR --config.mode=compile \
      --config.compile.topology=v5e:2x4 [--config.compile.what=all] [--config.compile.find_batch=True]

No data is read and no TPU is needed (libtpu is: pip install 'jax[tpu]'). For each program
(compile.what: train | eval | ptq | all, qtx.aot.programs) it writes a record to
DIR/compile.json (keys of qtx.aot.report.KEYS: topology, device_kind, chips, hosts,
per_chip_batch, microbatches, hbm_bytes, argument_bytes, temp_bytes, output_bytes, fits, flops,
bytes_accessed, collective_bytes, roofline_s, roofline_mfu, bound, compile_s, ...), the same as a
table in DIR/compile.md and a metrics row, and prints one summary line. train.microbatches=0
(auto) picks the fewest microbatches that fit, as a real run does (qtx.aot.fit);
compile.find_batch searches the largest per-chip batch that fits. Figures come from the TPU
compiler's memory plan and cost model: estimates, not measurements.
"""
from __future__ import annotations

import copy
import json

import jax
from etils import epath

from qtx import metrics as metrics_lib
from qtx.aot import fit as fit_lib
from qtx.aot import programs as programs_lib
from qtx.aot import report
from qtx.aot import topology as topology_lib


def _log(msg: str) -> None:
  print(msg, flush=True)


def run(config, workdir: str) -> dict:
  c = config.compile
  topo = topology_lib.parse(c.topology, int(c.num_slices))
  wanted = programs_lib.names(c.what)
  devices = topology_lib.devices(topo)
  n = len(devices)
  config = copy.deepcopy(config)
  if int(c.per_chip_batch) > 0:
    config.train.batch_size = int(c.per_chip_batch) * n
  split = fit_lib.batch_devices(config, n)
  eval_b = config.eval.batch_size
  config.eval.batch_size = -(-eval_b // split) * split  # whole rows per batch-sharded device
  kw = dict(topology=topo.name, hosts=topo.hosts, headroom=float(c.hbm_headroom))
  _log(f"qtx: compiling for {topo.name} ({n} chips of {devices[0].device_kind}, {topo.hosts} "
       f"host(s){f', {topo.num_slices} slices' if topo.num_slices > 1 else ''}); mesh "
       f"{dict(zip(('data', 'fsdp', 'tensor'), _mesh(config, n)))}")
  out = {"topology": topo.name, "num_slices": topo.num_slices, "chips": n, "hosts": topo.hosts,
         "config": config.data.preset or "", "programs": [], "search": []}
  records = []
  if c.find_batch:
    best, tries = fit_lib.find_batch(config, devices, log=_log, **kw)
    out["search"] += tries
    out["largest_per_chip_batch"] = best
    _log(f"qtx: largest batch per chip that fits: {best}")
    if best is None:
      raise ValueError(f"not even {8} images per chip fit on {topo.name}; use more chips or "
                       "set model.remat=full")
    config.train.batch_size = best * n
    if int(config.train.microbatches) == 0:
      config.train.microbatches = 1
  if "train" in wanted:
    if int(config.train.microbatches) == 0:
      m, tries = fit_lib.choose_microbatches(config, devices, log=_log, **kw)
      out["search"] += tries[:-1]
      records.append(tries[-1])
      _log(f"qtx: train.microbatches=auto -> {m}")
    else:
      records.append(fit_lib.compile_train(config, devices, **kw))
  rest = [w for w in wanted if w != "train"]
  if rest:
    progs = programs_lib.build(config, devices, ",".join(rest))
    for p in progs:
      _log(f"qtx: compiling {p.name} ...")
      records.append(report.compile_program(p, devices, **kw))
  out["programs"] = records
  wd = epath.Path(workdir)
  if jax.process_index() == 0:
    (wd / "compile.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    (wd / "compile.md").write_text(
        f"Compiled for {topo.name} by `--config.mode=compile` (the TPU compiler's memory plan "
        "and cost model: estimates, not measurements).\n\n" + report.markdown(records))
  writer = metrics_lib.MetricsWriter(workdir)
  row = {}
  for r in records:
    p = f"compile/{r['program']}_"
    row[p + "fits"] = float(bool(r["fits"]))
    for k in ("used_bytes", "roofline_s", "roofline_mfu", "compile_s"):
      if r.get(k) is not None:
        row[p + k] = float(r[k])
  writer.write(0, row)
  writer.close()
  line = report.summary(records)
  if jax.process_index() == 0:
    print(line, flush=True)
  return out


def _mesh(config, n):
  from qtx import parallel
  return parallel.mesh_shape(config.mesh.shape, n)
