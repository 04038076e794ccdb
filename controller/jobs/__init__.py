"""Persisted jobs: a job is a row with ordered step rows, driven by `engine.JobRunner`.

`states` holds the one table of allowed status transitions; `engine` holds the
step protocol, the job-kind registry and the runner. This package initialiser
imports nothing so that the store can import `states` without a cycle.
"""
