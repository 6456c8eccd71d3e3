"""CRIS (CLIP-Driven Referring Image Segmentation) as a library: model, data, training, metrics."""

__version__ = "0.1.0"
