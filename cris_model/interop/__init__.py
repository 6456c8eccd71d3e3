"""Interoperability: reference CRIS.pytorch checkpoints, OpenAI CLIP archives, ONNX export.

- `reference_names`: the one table between the reference's tensor names and ours.
- `reference`: `cris import reference`, a reference train.py checkpoint -> our checkpoint.
- `clip_archive`: OpenAI CLIP TorchScript archives read as plain tensors, no code run.
- `onnx_export`: `cris export --format onnx`, checked against PyTorch with onnxruntime.
"""
