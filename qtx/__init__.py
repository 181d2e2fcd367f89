"""qtx: quantization-friendly CLIP pretraining in JAX/Flax (see README.md)."""
from qtx import tpu_host as _tpu_host

__version__ = "0.1.0"

# libtpu on a host without TPU chips: compile-only use, without its warnings; on a host without
# any accelerator JAX runs on the CPU without trying the installed plugins first (qtx.tpu_host)
_tpu_host.quiet_compile_only()
_tpu_host.cpu_platform_default()
