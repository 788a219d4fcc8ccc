"""MLflow: runs (`runs.tracked_run`), the model registry, and store errors in words. Importing the
package imports nothing: `run_guard` and the data stages must not pay for MLflow."""
