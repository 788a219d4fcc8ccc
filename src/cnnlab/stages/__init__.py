"""One module per DVC stage, named as in dvc.yaml: download, split, augment, train, feature_extract,
fine_tune, evaluate, register. Each holds the stage's function, with explicit arguments; the
scripts in pipeline/ read params.yaml, call it and print what it returns. The stages import the
library modules of the package (data, models, engine, outputs, tracking, ...), never each other.
"""
