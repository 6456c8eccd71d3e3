"""Dagster orchestration of the CRIS pipeline: assets, blocking data checks, resources, jobs.

Thin by design: every asset calls one `cris_model` function or one `cris` verb, so Dagster,
DVC (`dvc.yaml`) and the command line all run the same code with the same `params.yaml`.
"""
