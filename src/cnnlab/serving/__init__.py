"""The served model: the MLflow pyfunc (logged as code), request batching, and its requirements."""
