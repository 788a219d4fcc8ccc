"""Importing cnnlab must leave a user's process as it was: a notebook imports it next to its own
matplotlib backend and torch settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

# A fresh interpreter, so that nothing this test session imported or set hides a change. The
# settings are ones no cnnlab module would choose: pdf is no interactive backend and not Agg, one
# thread is not a cap of min(4, cores) on a machine with 2 or more.
_SCRIPT = """
import importlib, json, pkgutil, sys
import matplotlib, torch
matplotlib.use("pdf")
torch.set_num_threads(1)
import cnnlab
imported = []
for info in pkgutil.walk_packages(cnnlab.__path__, "cnnlab."):
    if info.name == "cnnlab.__main__":  # `python -m cnnlab`: importing it runs the command line
        continue
    importlib.import_module(info.name)
    imported.append(info.name)
print(json.dumps({"backend": matplotlib.get_backend(), "threads": torch.get_num_threads(),
                  "pyplot": "matplotlib.pyplot" in sys.modules, "imported": imported}))
"""


def test_importing_every_module_changes_no_global_state() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # every module was imported, not a few that happened to be clean
    assert {"cnnlab.evaluation.figures", "cnnlab.data.augment", "cnnlab.serving.pyfunc", "cnnlab.serving.pyfunc_model",
            "cnnlab.models.zoo"} <= set(got["imported"])
    assert got["backend"] == "pdf"
    assert got["threads"] == 1
    # pyplot registers figures and may pick a backend of its own the first time it is imported
    assert not got["pyplot"]
