"""Multi-process runs on one machine through launch/local.py (2 processes x 4 CPU devices).

The slow test trains the micro model for 4 steps as 2 processes x 4 devices and as 1 process x
8 devices (same seed, same global batch size, mesh data=-1) and compares metrics.jsonl:
train/loss and train/grad_norm within rtol 1e-5 (measured: ~1e-7), evaluation metrics equal.

Why the losses can be compared step by step: the grain pipeline gives process p the records
p, p + P, p + 2P, ... of the stream, so at step t the two processes together hold exactly the
records of the single-process batch t, in a different order (process 0's half first:
[0, 2, 4, 6, 1, 3, 5, 7] for a batch of 8 over 2 processes). The contrastive losses and their
gradients are sums over all (image, text) pairs, invariant to permuting the examples (images and
texts together), so only float summation order differs.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from qtx import config_lib
from qtx.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local.py")
sys.path.insert(0, os.path.join(ROOT, "launch"))
import local  # noqa: E402  (launch/local.py)

MICRO_FLAGS = [
    "--config.model.embed_dim=16", "--config.model.image.width=32",
    "--config.model.image.depth=1", "--config.model.image.heads=2",
    "--config.model.image.mlp_dim=64", "--config.model.text.width=32",
    "--config.model.text.depth=1", "--config.model.text.heads=2",
    "--config.model.text.mlp_dim=64", "--config.model.image.image_size=16",
    "--config.model.text.context_length=16",
    "--config.train.batch_size=8", "--config.eval.num_samples=16", "--config.eval.batch_size=8",
    "--config.data.synthetic.eval_size=16", "--config.train.log_every=1", "--config.train.total_steps=4",
    "--config.mesh.num_devices=0", "--config.mesh.shape.data=-1",
]


def _clean_env(extra_pythonpath=None):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_", "QTX_", "SLURM_"))}
  if extra_pythonpath:
    env["PYTHONPATH"] = str(extra_pythonpath)
  return env


def _launch(args, env, timeout=300):
  return subprocess.run([sys.executable, LAUNCHER, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_process_env_sets_coordinator_devices_and_collectives():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d",
          "SLURM_JOB_ID": "7", "PYTHONPATH": "/x", "HOME": "/h"}
  env = local.process_env(base, 1, 2, 4, "127.0.0.1:1234")
  assert env["QTX_COORDINATOR"] == "127.0.0.1:1234"
  assert (env["QTX_NUM_PROCESSES"], env["QTX_PROCESS_ID"]) == ("2", "1")
  assert (env["JAX_PLATFORMS"], env["JAX_NUM_CPU_DEVICES"]) == ("cpu", "4")
  assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"
  assert "SLURM_JOB_ID" not in env and env["HOME"] == "/h"
  assert env["PYTHONPATH"] == ROOT + os.pathsep + "/x"
  assert base["XLA_FLAGS"].startswith("--xla_force")  # the input is left alone
  known, rest = local.parse_args(["--processes", "3", "--", "--config", "c.py",
                                  "--processes=9"])
  assert known.processes == 3 and rest == ["--config", "c.py", "--processes=9"]


PROBE = """
import json, os
from qtx import distributed
distributed.initialize()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from qtx import parallel
mesh = parallel.make_mesh({"data": -1})
x = parallel.global_batch({"x": np.arange(4.0) + 4 * jax.process_index()}, mesh)["x"]
total = jax.jit(lambda x: jnp.sum(x), out_shardings=NamedSharding(mesh, P()))(x)
# the ring loss across processes (ppermute over gloo) against the plain global loss
from qtx import losses
rng = np.random.default_rng(0)
z = rng.normal(size=(2, 16, 8)).astype(np.float32)
z /= np.linalg.norm(z, axis=-1, keepdims=True)
half = slice(8 * jax.process_index(), 8 * jax.process_index() + 8)
zz = parallel.global_batch({"i": z[0][half], "t": z[1][half]}, mesh)
rep = NamedSharding(mesh, P())
diffs = {}
for name in ("clip", "siglip", "infoloob"):
  def both(zi, zt):
    f = lambda fn: jax.value_and_grad(fn, argnums=(0, 1, 2))(zi, zt, jnp.float32(1.5),
                                                             jnp.float32(-1.0))
    ring = f(lambda *a: losses.compute(name, *a, mesh=mesh))
    plain = f(lambda *a: losses.compute(name, *a))
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(ring),
                                                                       jax.tree.leaves(plain))]))
  diffs[name] = float(jax.jit(both, out_shardings=rep)(zz["i"], zz["t"]))
print("PROBE " + json.dumps({"pid": jax.process_index(), "count": jax.process_count(),
      "devices": jax.device_count(), "local": jax.local_device_count(),
      "mesh": list(mesh.devices.shape), "sum": float(total)}), flush=True)
print("RING " + json.dumps(diffs), flush=True)
# the same value everywhere passes; different ones name who sees what
distributed.assert_same("probe", "same value")
try:
  distributed.assert_same("the training data's index", f"index{jax.process_index()}", "Fix it.")
  msg = None
except ValueError as e:
  msg = str(e)
print("SAME " + json.dumps(msg), flush=True)
"""


def test_launcher_builds_one_global_cpu_mesh_and_ring_losses_work_across_processes(tmp_path):
  (tmp_path / "mp_probe.py").write_text(PROBE)
  r = _launch(["--processes", "2", "--devices_per_process", "4", "--module", "mp_probe",
               "--timeout", "120"], _clean_env(tmp_path), timeout=180)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  probes = sorted((line.split(" ", 1)[0], json.loads(line.split("PROBE ", 1)[1]))
                  for line in r.stdout.splitlines() if "PROBE " in line)
  assert [p for p, _ in probes] == ["[p0]", "[p1]"]
  for i, (_, rec) in enumerate(probes):
    assert rec == {"pid": i, "count": 2, "devices": 8, "local": 4, "mesh": [8, 1, 1],
                   "sum": float(sum(range(8)))}
  rings = [json.loads(line.split("RING ", 1)[1]) for line in r.stdout.splitlines()
           if "RING " in line]
  assert len(rings) == 2
  for diffs in rings:  # value and gradients of the ring losses across the two processes
    assert set(diffs) == {"clip", "siglip", "infoloob"} and max(diffs.values()) < 1e-5, diffs
  same = [json.loads(line.split("SAME ", 1)[1]) for line in r.stdout.splitlines()
          if "SAME " in line]
  assert same == [("the training data's index differs between the processes of this run "
                   "(process(es) [0] see 'index0'; process(es) [1] see 'index1'). Fix it.")] * 2


FAILING = """
import os, sys, time
pid = int(os.environ["QTX_PROCESS_ID"])
if pid == 0:
  while not os.path.exists(os.environ["PIDFILE"]):  # the other one is up and sleeping
    time.sleep(0.05)
  print("process 0 fails", flush=True)
  sys.exit(3)
with open(os.environ["PIDFILE"] + ".tmp", "w") as f:
  f.write(str(os.getpid()))
os.rename(os.environ["PIDFILE"] + ".tmp", os.environ["PIDFILE"])
time.sleep(600)
"""


def test_launcher_stops_the_others_and_fails_when_one_process_fails(tmp_path):
  (tmp_path / "mp_fail.py").write_text(FAILING)
  env = _clean_env(tmp_path)
  env["PIDFILE"] = str(tmp_path / "p1.pid")
  t0 = time.monotonic()
  r = _launch(["--processes", "2", "--module", "mp_fail", "--grace", "2"], env, timeout=120)
  elapsed = time.monotonic() - t0
  assert r.returncode == 3, r.stdout
  assert "[p0] process 0 fails" in r.stdout
  assert "[launch] process 0 exited with code 3; stopped the others" in r.stdout
  assert elapsed < 60, elapsed
  other = int((tmp_path / "p1.pid").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(other, 0)


def test_launcher_forwards_sigterm(tmp_path):
  (tmp_path / "mp_term.py").write_text(textwrap.dedent("""
      import os, signal, sys, time
      def bye(signum, frame):
        print("got SIGTERM", flush=True)
        sys.exit(0)
      signal.signal(signal.SIGTERM, bye)
      print("ready", flush=True)
      time.sleep(600)
      """))
  p = subprocess.Popen([sys.executable, LAUNCHER, "--processes", "2", "--module", "mp_term"],
                       cwd=ROOT, env=_clean_env(tmp_path), stdout=subprocess.PIPE, text=True)
  seen = 0
  while seen < 2:
    line = p.stdout.readline()
    assert line, "launcher ended early"
    seen += line.rstrip().endswith("ready")
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 0, out
  assert "[p0] got SIGTERM" in out and "[p1] got SIGTERM" in out


def _micro_tiny_config():
  """configs/clip_tiny.py with MICRO_FLAGS applied (for the data-pipeline check)."""
  c = config_lib.tiny_config()
  for flag in MICRO_FLAGS:
    key, value = flag[len("--config."):].split("=")
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = type(node[last])(value)
  return c


def test_process_slices_hold_the_single_process_batch():
  c = _micro_tiny_config()
  single = iter(pipeline.train_dataset(c, 0, 1))
  per_process = [iter(pipeline.train_dataset(c, p, 2)) for p in range(2)]
  B = c.train.batch_size
  for _ in range(3):
    want = next(single)
    got = [next(it) for it in per_process]
    for key in ("image", "tokens"):
      glob = np.concatenate([g[key] for g in got])  # make_array_from_process_local_data order
      assert glob.shape == want[key].shape
      order = np.r_[0:B:2, 1:B:2]  # process 0: records 0, 2, 4, 6; process 1: 1, 3, 5, 7
      np.testing.assert_array_equal(glob, want[key][order])


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/i2t_r1" in r]
  return train, evals


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  common = ["--config", "configs/clip_tiny.py", *MICRO_FLAGS]
  env = _clean_env()
  single_env = dict(env, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  single = subprocess.Popen([sys.executable, "-m", "qtx.main", "--workdir",
                             str(tmp_path / "single"), *common], cwd=ROOT, env=single_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    multi = _launch(["--processes", "2", "--devices_per_process", "4", "--timeout", "400", "--",
                     "--workdir", str(tmp_path / "multi"), *common], env, timeout=450)
    single_out, _ = single.communicate(timeout=450)
  finally:
    if single.poll() is None:
      single.kill()
  assert multi.returncode == 0, multi.stdout[-4000:] + multi.stderr[-2000:]
  assert single.returncode == 0, single_out[-4000:]
  assert "[p1]" in multi.stdout and "[p0] qtx: step 4 | loss" in multi.stdout

  train_m, eval_m = _losses(tmp_path / "multi")
  train_s, eval_s = _losses(tmp_path / "single")
  assert [r["step"] for r in train_m] == [r["step"] for r in train_s] == [1, 2, 3, 4]
  for key in ("train/loss", "train/grad_norm", "train/logit_scale", "train/lr"):
    np.testing.assert_allclose([r[key] for r in train_m], [r[key] for r in train_s],
                               rtol=1e-5, err_msg=key)
  assert len(eval_m) == len(eval_s) == 1
  for key in ("eval/i2t_r1", "eval/i2t_r5", "eval/t2i_r1", "eval/t2i_r5", "eval/zeroshot_top1"):
    assert eval_m[0][key] == eval_s[0][key], key
  # one orbax checkpoint written together by both processes (data-iterator state per process)
  step_dir = tmp_path / "multi" / "checkpoints" / "4"
  assert (step_dir / "state").is_dir()
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data"))


@pytest.mark.slow
def test_two_processes_agree_on_the_data_index_and_refuse_changed_shards(tmp_path):
  """Webdataset training as 2 processes: process 0 writes WORKDIR/data_index.json once, and a
  resume after a shard's content changed (same path) stops both processes with the message,
  instead of one raising while the other waits in a collective."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_webdataset import make_shards
  shards = tmp_path / "shards"
  make_shards(str(shards), n_shards=4, per_shard=8)
  flags = [f for f in MICRO_FLAGS if not f.startswith("--config.train.total_steps=")]
  common = ["--config", "configs/clip_tiny.py", *flags, "--config.data.name=webdataset",
            f"--config.data.path={shards / '{00000..00003}.tar'}",
            "--workdir", str(tmp_path / "run")]
  launch = ["--processes", "2", "--devices_per_process", "4", "--timeout", "300", "--"]
  r = _launch([*launch, *common, "--config.train.total_steps=2"], _clean_env(), timeout=360)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
  saved = json.loads((tmp_path / "run" / "data_index.json").read_text())
  # (of the 32 samples, the source holds some out for evaluation when there is no eval_path)
  assert saved["describe"].endswith(
      f" train samples in 4 shard(s) of {str(shards / '{00000..00003}.tar')!r}"), saved
  make_shards(str(shards / "other"), n_shards=1, per_shard=8, seed=1)
  os.replace(shards / "other" / "00000.tar", shards / "00003.tar")  # same path, other images
  t0 = time.time()
  r = _launch([*launch, *common, "--config.train.total_steps=4"], _clean_env(), timeout=360)
  out = r.stdout + r.stderr
  assert r.returncode != 0 and time.time() - t0 < 200, out[-4000:]
  assert "the training data changed since the run started" in out, out[-4000:]
  assert "the saved data index" not in out and "differs between the processes" not in out
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]


# ---------------------------------------------------------------------------------------------
# Shell launchers with stand-ins for gcloud and srun (quoting, pid handling, srun arguments).

FAKE_GCLOUD = """#!/usr/bin/env bash
# stand-in: `tpu-vm ssh --command=C` runs C here (HOME is the worker's home); anything else echoes
for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}";; esac; done
echo "gcloud $*"
"""
FAKE_QTX_MAIN = """
import json, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(0)))
print("ARGS " + json.dumps(sys.argv[1:]), flush=True)
time.sleep(120)
"""


def _fake_bin(tmp_path, name, text):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / name).write_text(text)
  (bin_dir / name).chmod(0o755)
  return bin_dir


def test_tpu_pod_script_starts_quotes_and_stops_the_run(tmp_path):
  home = tmp_path / "home"
  (home / "qtx" / "qtx").mkdir(parents=True)
  (home / "qtx" / "qtx" / "__init__.py").write_text("")
  (home / "qtx" / "qtx" / "main.py").write_text(FAKE_QTX_MAIN)
  (home / "qtx-venv" / "bin").mkdir(parents=True)
  (home / "qtx-venv" / "bin" / "activate").write_text("")
  bin_dir = _fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
  env = dict(_clean_env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(home),
             TPU_NAME="pod", ZONE="z", WORKDIR="/mnt/a b")
  script = os.path.join(ROOT, "launch", "tpu_pod.sh")
  sh = lambda *a: subprocess.run(["bash", script, *a], env=env, capture_output=True, text=True,
                                 timeout=60)
  r = sh("run", "--config.train.total_steps=10", "--config.init_from=x y'z")
  assert r.returncode == 0 and "started pid" in r.stdout, r.stdout + r.stderr
  log = home / "qtx-run.log"
  deadline = time.monotonic() + 30
  while "ARGS" not in (log.read_text() if log.exists() else ""):
    assert time.monotonic() < deadline, "the run did not start"
    time.sleep(0.1)
  args = json.loads(log.read_text().split("ARGS ", 1)[1].splitlines()[0])
  assert args == ["--config", "configs/clip_b16.py", "--workdir", "/mnt/a b",
                  "--config.train.total_steps=10", "--config.init_from=x y'z"]
  again = sh("run")
  assert again.returncode != 0 and "a run is still alive" in again.stderr
  assert "SIGTERM sent" in sh("stop").stdout
  deadline = time.monotonic() + 30
  while "got SIGTERM" not in log.read_text():
    assert time.monotonic() < deadline, "the run did not get SIGTERM"
    time.sleep(0.1)
  env["DRY_RUN"] = "1"  # install: only print the gcloud commands
  r = sh("install")
  assert r.returncode == 0, r.stderr
  assert "gcloud compute tpus tpu-vm scp" in r.stdout and "pod:qtx-src.tar.gz" in r.stdout
  assert "--worker=all" in r.stdout and "pip install -q -e ~/qtx" in r.stdout
  assert sh("dance").returncode == 2


def test_slurm_script_runs_one_srun_step_with_qtx(tmp_path):
  bin_dir = _fake_bin(tmp_path, "srun", "#!/usr/bin/env bash\n"
                      "python3 -c 'import json,sys; print(\"SRUN \" + json.dumps(sys.argv[1:]))'"
                      " \"$@\"\n")
  env = dict(_clean_env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NAME="qtx", SLURM_JOB_ID="42",
             WORKDIR=str(tmp_path / "run"), GPUS_PER_NODE="4")
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"),
                      "--config.train.total_steps=7"], env=env, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  srun = json.loads(r.stdout.split("SRUN ", 1)[1])
  assert srun[:3] == ["--kill-on-bad-exit=1", "--gpu-bind=none", "--ntasks-per-node=4"]
  assert srun[3:] == ["python", "-u", "-m", "qtx.main", "--config", "configs/clip_b16.py",
                      "--workdir", str(tmp_path / "run"), "--config.train.total_steps=7"]
  assert (tmp_path / "run").is_dir()
