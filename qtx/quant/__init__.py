"""Fake quantization, range estimators, outlier statistics and quantized Linen blocks."""
from qtx.quant.fake_quant import fake_quant, quant_grid, validate_bits
from qtx.quant.estimators import minmax, mse_range, percentile, running_minmax
from qtx.quant.outliers import (OutlierAccumulator, inf_norm_per_sequence, kurtosis,
                                kurtosis_per_sequence, plot_outliers, summarize)
from qtx.quant.layers import ActQuant, QDense, QLayerNorm, QuantConfig, quantize_weight

__all__ = [
    "fake_quant", "quant_grid", "validate_bits",
    "minmax", "running_minmax", "percentile", "mse_range",
    "kurtosis", "inf_norm_per_sequence", "kurtosis_per_sequence", "summarize",
    "OutlierAccumulator", "plot_outliers",
    "ActQuant", "QDense", "QLayerNorm", "QuantConfig", "quantize_weight",
]
