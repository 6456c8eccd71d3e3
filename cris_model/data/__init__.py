"""Referring-expression data: original-format readers, manifests, synthetic data, fetch."""
