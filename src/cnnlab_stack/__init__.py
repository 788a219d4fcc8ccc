"""The team's tracking stack (PostgreSQL + SeaweedFS + MLflow server with auth) on loopback: a
tool beside the cnnlab library, which never imports it. `python -m cnnlab_stack --help`."""
