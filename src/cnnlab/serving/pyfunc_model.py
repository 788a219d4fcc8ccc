"""Models-from-code entry point of the served classifier (logged by `cnnlab.serving.log_classifier`).

MLflow copies this file into every logged model and runs it when the model is loaded, with the
model's shipped ``code/`` folder (this package) on ``sys.path``; all it may do is declare the
model. Logging a file rather than a `PythonModel` object means nothing is pickled: loading a
model runs this reviewed code, never a cloudpickle (MLflow warns about those, and can be told to
refuse them with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false).
"""

from mlflow.models import set_model

from cnnlab.serving.pyfunc import ImageClassifierModel

set_model(ImageClassifierModel())
