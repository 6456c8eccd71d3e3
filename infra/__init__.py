"""Real services for the pipeline: an S3 store, an MLflow server, the Dagster instance.

`infra.services` starts and stops them (in tests, and behind `make services`);
`infra.stack` is the one switch (`CRIS_STACK=services`) that points the pipeline at them.
Nothing here imports Dagster or DVC.
"""
