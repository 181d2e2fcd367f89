"""Named quantization settings: the QuantConfig fields each one sets."""
from __future__ import annotations

# Named quantization settings PTQ can evaluate besides the config's own (`quant.settings`);
# each overrides these QuantConfig fields, the rest (estimator, keep_float, ...) stay the
# config's. w8a8 is the paper's setting (Bondarenko et al. 2023: per-tensor weights, static
# per-tensor activations); w8a8_token makes the activations dynamic per token; w4a8 has 4-bit
# per-channel weights (per-tensor 4-bit weights leave too few levels per output channel).
SETTINGS = {
    "w8a8": dict(weight_bits=8, act_bits=8, weight_granularity="per_tensor",
                 act_granularity="per_tensor"),
    "w8a8_token": dict(weight_bits=8, act_bits=8, weight_granularity="per_tensor",
                       act_granularity="per_token"),
    "w4a8": dict(weight_bits=4, act_bits=8, weight_granularity="per_channel",
                 act_granularity="per_tensor"),
    "w8a8_channel": dict(weight_bits=8, act_bits=8, weight_granularity="per_channel",
                         act_granularity="per_tensor"),
}


def setting_names(spec: str) -> list[str]:
  """The names of a comma-separated `quant.settings` value, checked against SETTINGS."""
  names = [w.strip() for w in str(spec or "").split(",") if w.strip()]
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    raise ValueError(f"quant.settings: unknown setting(s) {unknown}; choose from "
                     f"{tuple(SETTINGS)}")
  return names
