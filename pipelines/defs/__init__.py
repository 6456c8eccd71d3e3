"""The parts of the Dagster definitions: assets, checks, resources, jobs and their params."""
