"""Prefect flows chaining the tasks in ``tasks/``."""

import os

# Quiet, offline-friendly defaults; any value set by the user wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")
# Prefect's own loggers stay at WARNING, but the flow and task run loggers (which carry the flow's
# events and each `cxr` step's log lines, tasks/runner.py) log at INFO: to the Prefect API (the UI
# shows every epoch and error) and to the console.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "INFO")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
# The ephemeral API server runs its database migrations on first start; on a loaded two-core machine that
# takes longer than Prefect's 20 s default, and the whole run would fail before its first task.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
