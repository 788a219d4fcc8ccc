"""Models-from-code entry point of the ONNX Runtime model (logged by
`cnnlab.serving.onnx_pyfunc.log_onnx_model`); see `cnnlab/serving/pyfunc_model.py` for why a file."""

from mlflow.models import set_model

from cnnlab.serving.onnx_pyfunc import OnnxClassifierModel

set_model(OnnxClassifierModel())
