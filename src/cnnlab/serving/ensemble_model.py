"""Models-from-code entry point of the served ensemble (logged by `cnnlab.serving.ensemble.log_ensemble`).

As `pyfunc_model.py`: MLflow copies this file into the logged model and runs it on load, with the
shipped cnnlab package on ``sys.path``; it only declares the model, so nothing is unpickled.
"""

from mlflow.models import set_model

from cnnlab.serving.ensemble import EnsembleClassifierModel

set_model(EnsembleClassifierModel())
