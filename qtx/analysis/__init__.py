"""Measurements of a trained model: outlier statistics of its towers, figures, PTQ ablation."""
