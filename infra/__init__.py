"""Real services for the pipeline: an S3 store, an MLflow server, the Dagster instance.

`infra.s3`, `infra.mlflow_server` and `infra.postgres` hold the servers (on the process
helpers of `infra.process`); `infra.services` starts and stops them all (behind
`make services`); `infra.stack` is the one switch (`CRIS_STACK=services`) that points the
pipeline at them. Nothing here imports Dagster or DVC.
"""
