"""Crash anywhere, lose nothing: bench/crash_anywhere.py --quick, a real `dvc repro` in a small
git + DVC copy of the project, each stage SIGKILLed at a seeded random moment and recovered (its
docstring lists the checks). One test: every scenario shares the reference run, which is most of
the cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

STAGES = ("download", "split", "augment", "scratch@scratch", "feature_extract@feature_extract", "fine_tune@fine_tune",
          "evaluate", "register")


def test_every_stage_killed_at_a_random_moment_recovers_byte_identical_with_no_run_left_running():
    done = subprocess.run([sys.executable, str(REPO / "bench/crash_anywhere.py"), "--quick", "--seed", "0"],
                          capture_output=True, text=True, timeout=3000)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    lines = done.stdout.splitlines()
    for stage in STAGES:  # each stage really was killed (not finished first) and recovered
        line = next(line for line in lines if line.startswith(f"SIGKILL {stage}, run it again"))
        assert " ok " in line and "killed at" in line, line
    for scenario in ("SIGKILL scratch@scratch, dvc repro (run cache)", "two dvc repro at once",
                     "SIGKILL dvc and its stage"):
        assert any(line.startswith(scenario) and " ok " in line for line in lines), report[-6000:]
