"""Crash anywhere, lose nothing: SIGKILL each stage at a seeded random moment, run `dvc repro`
again, and check that nothing was lost or left behind.

    .venv/bin/python bench/crash_anywhere.py [--quick] [--seed 0] [--keep DIR]   # --quick: 14 min on 2 busy cores

In a small copy of the project (a git + DVC repo in a temporary folder, the default store
`mlflow.db` in it), after one uninterrupted `dvc repro` (the reference), for each stage in order:
start ``dvc repro -f -s STAGE``, SIGKILL the stage's own process (``python pipeline/<stage>.py``,
what the OOM killer or ``kill -9`` does) at a moment drawn uniformly from 5-95% of the stage's
reference time, then run it again with ``dvc repro -f -s STAGE`` (forced: a plain ``dvc repro``
would restore its outputs from DVC's cache and run no code; this one really runs, and a training
stage resumes its checkpoint) and ``dvc repro`` for the stages after it. After each recovery:
``dvc status`` is clean, every metrics file is byte-identical to the reference, the files under
``data/`` are the reference's (no partial output), and no MLflow run is RUNNING. Then three more
scenarios: a plain ``dvc repro`` after the kill, which restores the stage from DVC's cache (the
killed run must still end KILLED and its temp files go, though no stage code runs), two ``dvc repro`` at once (the second stops with DVC's lock message, the first
finishes), and SIGKILL of ``dvc`` itself with its stage (the next ``dvc repro`` is not blocked).

Prints one line per scenario and exits 1 if any check failed. tests/test_crash.py runs it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from project_copy import copy_project, project_params, tool_argv, tool_env

STAGES = ("download", "split", "augment", "scratch@scratch", "scratch@regularized", "feature_extract@feature_extract",
          "fine_tune@fine_tune", "evaluate", "register")
SMALL = {"split": {"max_train_per_class": 5, "max_val_per_class": 6, "max_test_per_class": 4},
         "augment": {"copies": 1, "preview_images": 3},
         "scratch": {"epochs": 4, "lr": 0.01, "arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}},
         "fine_tune": {"epochs": 2}}
# The same folders are written again by a stage's re-run, with the same bytes: what "lose nothing"
# compares. data/registry.json is not: re-logging a variant makes a new model version.
COMPARED = ("data/metrics", "data/evaluation")
UP_TO_DATE = "Data and pipelines are up to date."
# DVC's two answers to a second repro: the repository lock, or the outputs' read/write lock.
LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")


def workspace(path: Path, *, quick: bool = False) -> Path:
    """The project in ``path``, small; ``quick``: without the `regularized` variant (the same code
    as `scratch`) and with fewer epochs, what tests/test_crash.py runs."""
    params = project_params(**SMALL)
    params["feature_extract"].update(image_size=32, head={**params["feature_extract"]["head"], "epochs": 4})
    params["variants"]["scratch"]["regularized"]["epochs"] = 4
    if quick:
        del params["variants"]["scratch"]["regularized"]
        params["scratch"]["epochs"] = params["fine_tune"]["epochs"] = params["feature_extract"]["head"]["epochs"] = 2
    return copy_project(path, params)


@dataclass
class Attempt:
    """One `dvc` invocation: its result and, when a stage process was watched, how long it lived."""

    returncode: int
    output: str
    stage_seconds: float | None = None
    killed: bool = False


def dvc(ws: Path, *args: str, stage: str | None = None, kill_after: float | None = None,
        kill_dvc_too: bool = False, timeout: float = 900) -> Attempt:
    """Run ``dvc *args``; with ``stage``, watch that stage's process and, after ``kill_after``
    seconds of its life, SIGKILL it (and with ``kill_dvc_too`` the whole dvc process group)."""
    proc = subprocess.Popen(tool_argv(["dvc", *args]), cwd=ws, env=tool_env(ws), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    attempt = Attempt(returncode=-1, output="")
    if stage is not None:
        attempt.stage_seconds, attempt.killed = _watch_stage(ws, stage, proc, kill_after, kill_dvc_too)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    attempt.returncode, attempt.output = proc.returncode, out
    return attempt


def _watch_stage(ws: Path, stage: str, proc: subprocess.Popen, kill_after: float | None,
                 kill_dvc_too: bool) -> tuple[float | None, bool]:
    script = f"pipeline/{stage.split('@')[0]}.py"
    pid, started = None, None
    while pid is None and proc.poll() is None:
        pid = _find_process(ws, script)
        time.sleep(0.02)
    if pid is None:
        return None, False
    started = time.monotonic()
    killed = False
    while _alive(pid):
        if kill_after is not None and not killed and time.monotonic() - started >= kill_after:
            if kill_dvc_too:
                os.killpg(proc.pid, signal.SIGKILL)
            _kill(pid)
            killed = True
        time.sleep(0.02)
    return time.monotonic() - started, killed


def _find_process(ws: Path, script: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if script.encode() in cmdline and Path(os.readlink(entry / "cwd")) == ws:
                return int(entry.name)
        except OSError:
            continue
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def snapshot(ws: Path) -> dict[str, bytes]:
    """The compared files' bytes, by path."""
    return {str(p.relative_to(ws)): p.read_bytes() for d in COMPARED for p in sorted((ws / d).rglob("*")) if p.is_file()}


def listing(ws: Path, *, ignore: tuple[str, ...] = ()) -> set[str]:
    """Every file under data/ (what a partial output would add to), but the paths in ``ignore``:
    a killed training stage's checkpoint stays when DVC then restores the stage from its cache
    (resumable state, not an output: the stage's next full run resumes from it or drops it)."""
    return {str(p.relative_to(ws)) for p in (ws / "data").rglob("*")
            if p.is_file() and not str(p.relative_to(ws)).startswith(ignore)}


def running_runs(ws: Path, *, wait_s: float = 90) -> list[str]:
    """Runs still RUNNING in the workspace's store, after giving a killed run's watcher up to
    ``wait_s`` to end it."""
    deadline = time.monotonic() + wait_s
    while True:
        with sqlite3.connect(ws / "mlflow.db") as db:
            rows = [r[0] for r in db.execute("select name from runs where status = 'RUNNING'")]
        if not rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, scenario: str, problems: list[str], detail: str) -> None:
        line = f"{scenario:<44} {'ok  ' if not problems else 'FAIL'} {detail}"
        self.lines.append(line)
        print(line, flush=True)
        self.failures += [f"{scenario}: {p}" for p in problems]


def recovered(ws: Path, reference: dict[str, bytes], files: set[str], attempt: Attempt,
              ignore: tuple[str, ...] = ()) -> list[str]:
    """What is wrong after a recovery, if anything."""
    problems = []
    if attempt.returncode != 0:
        problems.append(f"dvc repro failed: {attempt.output[-2000:]}")
    status = dvc(ws, "status")
    if UP_TO_DATE not in status.output:
        problems.append(f"dvc status is not clean: {status.output[-1000:]}")
    now = snapshot(ws)
    if now.keys() != reference.keys():
        problems.append(f"metrics files differ: {sorted(now.keys() ^ reference.keys())}")
    problems += [f"{path} differs from the uninterrupted run" for path in now if path in reference
                 and now[path] != reference[path]]
    extra, missing = listing(ws, ignore=ignore) - files, files - listing(ws, ignore=ignore)
    if extra or missing:
        problems.append(f"files left behind {sorted(extra)}, missing {sorted(missing)}")
    if stuck := running_runs(ws):
        problems.append(f"runs left RUNNING: {stuck}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    ap.add_argument("--keep", type=Path, help="build the workspace here and keep it (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="one from-scratch variant, 2 epochs (the test's setting)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="cnnlab-crash-"))
    ws = workspace(root / "ws", quick=args.quick)
    stages = [s for s in STAGES if not (args.quick and s == "scratch@regularized")]
    report = Report()
    try:
        durations = {}
        for stage in stages:  # the reference, a stage at a time to time each stage's process
            attempt = dvc(ws, "repro", "-s", stage, stage=stage)
            if attempt.returncode != 0:
                raise RuntimeError(f"reference run of {stage} failed:\n{attempt.output[-3000:]}")
            durations[stage] = attempt.stage_seconds or 0.0
        reference, files = snapshot(ws), listing(ws)
        for stage in stages:
            at = rng.uniform(0.05, 0.95) * durations[stage]
            for _ in range(4):  # a re-run can be quicker than the reference: kill earlier until it lands
                killed = dvc(ws, "repro", "-f", "-s", stage, stage=stage, kill_after=at)
                if killed.killed:
                    break
                at /= 2
            rerun = dvc(ws, "repro", "-f", "-s", stage)
            again = dvc(ws, "repro") if rerun.returncode == 0 else rerun
            detail = (f"killed at {at:5.1f} s of {durations[stage]:5.1f} s" if killed.killed
                      else f"never killed: ended before {at:.1f} s")
            problems = recovered(ws, reference, files, again) + ([] if killed.killed else ["never killed"])
            report.check(f"SIGKILL {stage}, run it again", problems, detail)

        # DVC restores the stage from its run cache: no stage code runs, the watcher ends the run.
        stage = "scratch@scratch" if args.quick else "scratch@regularized"
        at = 0.5 * durations[stage]
        killed = dvc(ws, "repro", "-f", "-s", stage, stage=stage, kill_after=at)
        again = dvc(ws, "repro")
        # The killed attempt's checkpoint stays: resumable state, not an output (the stage's next
        # real run resumes from it, or drops it if params or data changed).
        problems = recovered(ws, reference, files, again, ignore=("data/checkpoints",))
        if f"Stage '{stage}' is cached - skipping run" not in again.output:
            problems.append(f"expected DVC to restore {stage} from its run cache: {again.output[-1000:]}")
        report.check(f"SIGKILL {stage}, dvc repro (run cache)", problems, f"killed at {at:.1f} s")

        # Two at once: the second stops on DVC's lock, the first finishes.
        first = subprocess.Popen(tool_argv(["dvc", "repro", "-f", "-s", "scratch@scratch"]), cwd=ws, env=tool_env(ws),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while _find_process(ws, "pipeline/scratch.py") is None and first.poll() is None:
            time.sleep(0.05)
        second = dvc(ws, "repro")
        out, _ = first.communicate(timeout=900)
        problems = [] if second.returncode != 0 and any(m in second.output for m in LOCK_MESSAGES) else [
            f"the second dvc repro did not stop on the lock: rc {second.returncode} {second.output[-1000:]}"]
        if first.returncode != 0:
            problems.append(f"the first dvc repro failed: {out[-2000:]}")
        # The first re-ran one stage (-s): bring the stages after it up to date, then compare.
        problems += recovered(ws, reference, files, dvc(ws, "repro"))
        report.check("two dvc repro at once", problems, "second: " + _lock_line(second.output))

        # dvc itself killed with the stage (a power cut or a killed terminal): no stale lock.
        stage = "scratch@scratch"
        at = 0.5 * durations[stage]
        killed = dvc(ws, "repro", "-f", "-s", stage, stage=stage, kill_after=at, kill_dvc_too=True)
        killed_note = "" if killed.killed else " (never killed)"
        rerun = dvc(ws, "repro", "-f", "-s", stage)
        again = dvc(ws, "repro") if rerun.returncode == 0 else rerun
        report.check("SIGKILL dvc and its stage, dvc repro", recovered(ws, reference, files, again),
                     f"killed at {at:.1f} s{killed_note}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    for failure in report.failures:
        print(f"  {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def _lock_line(output: str) -> str:
    lines = output.splitlines()
    return next((line.strip() for line in lines if any(m in line for m in LOCK_MESSAGES)), output.strip()[-120:])


if __name__ == "__main__":
    sys.exit(main())
