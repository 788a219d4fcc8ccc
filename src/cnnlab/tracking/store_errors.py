"""What a stage says when the tracking server refuses it or cannot be reached: one paragraph that
names the server, the user and the fix, instead of MLflow's traceback (`pipeline/_common.py`).

Apart from `cnnlab.tracking.runs` so that the data stages, which share that entry point but never
talk to MLflow, do not depend on the tracking code.
"""

from __future__ import annotations

import os


def store_error(exc: BaseException) -> str | None:
    """What to tell the user when the tracking store refused or could not be reached (one
    paragraph, no traceback); None when ``exc`` is something else."""
    from mlflow.exceptions import (
        MlflowException,  # here: the data stages never load MLflow
    )

    if not isinstance(exc, MlflowException):
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "the MLflow store")  # a server: it is always set then
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if exc.error_code in ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"):
        who = f"user {user!r}" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
        return (f"the MLflow server {uri} did not accept {who} (401). Set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to an account on it (for the team stack: eval \"$(python -m "
                "cnnlab_stack env)\").")
    if exc.error_code == "PERMISSION_DENIED":
        return (f"the MLflow server {uri} denied user {user!r} (403): {_first_line(exc.message)}. Ask its "
                "admin for EDIT permission on the experiment and on the registered model, or use an "
                "account that has them.")
    if "Max retries exceeded" in exc.message or "Connection refused" in exc.message:
        return (f"cannot reach the MLflow server {uri}: {_first_line(exc.message)}. Start it (the team "
                "stack: python -m cnnlab_stack up) or point MLFLOW_TRACKING_URI at a running one.")
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
