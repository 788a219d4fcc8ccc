"""cnnlab: train and compare CNN image classifiers on small datasets (DVC + MLflow)."""

__version__ = "0.1.0"
