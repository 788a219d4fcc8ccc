"""The team stack, measured: its cold start and memory, one small pipeline run against the MLflow
server next to the same run on the default sqlite store, and `dvc push` / `dvc pull` through the
stack's bucket.

    .venv/bin/python bench/team_stack.py     # ~10 min on a 2-core CPU

Everything runs in a temporary folder on free loopback ports (a stack of its own, not .stack/)
and is removed at the end. The two `dvc repro` runs use the same small config (5/3/4 images per
class, the four default variants with a few epochs), one after the other: run it on an idle
machine, the times are wall-clock.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from project_copy import BIN, REPO, copy_project, project_params, tool_env

sys.path.insert(0, str(REPO / "src"))

from cnnlab_stack.stack import Stack  # noqa: E402

SMALL = {"split": {"max_train_per_class": 5, "max_val_per_class": 6, "max_test_per_class": 4},
         "augment": {"copies": 1, "preview_images": 3},
         "scratch": {"epochs": 3, "lr": 0.01, "arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}},
         "fine_tune": {"epochs": 1}}


def workspace(path: Path) -> Path:
    params = project_params(**SMALL)
    params["feature_extract"].update(image_size=32, head={**params["feature_extract"]["head"], "epochs": 3})
    params["variants"]["scratch"]["regularized"]["epochs"] = 3
    return copy_project(path, params)


def run(cwd: Path, *cmd, env: dict[str, str] | None = None) -> float:
    """Run ``cmd``; its wall-clock seconds. Stops the benchmark with the output when it fails."""
    t0 = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=tool_env(cwd, env), capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            total += int(fields["VmRSS"].split()[0])
        except (OSError, KeyError, ValueError):
            pass
    return total / 1024


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="cnnlab-bench-stack-"))
    root.chmod(0o755)  # as root, PostgreSQL runs as `postgres`, which must enter the folder
    stack = Stack(root / "stack", ports={"mlflow": 0, "postgres": 0, "s3": 0}, say=lambda _: None)
    rows = Rows()
    try:
        t0 = time.perf_counter()
        stack.up()
        rows.append(("stack up, cold (initdb, bucket, MLflow tables)", f"{time.perf_counter() - t0:.1f} s"))
        time.sleep(5)
        for name, pids in stack.processes().items():
            rows.append((f"  {name}: RSS after start ({len(pids)} processes)", f"{rss_mib(pids):.0f} MiB"))
        local = workspace(root / "sqlite")
        server = workspace(root / "server")
        seconds = run(local, BIN / "dvc", "repro")
        rows.append(("dvc repro, default sqlite store", f"{seconds:.0f} s"))
        seconds = run(server, BIN / "dvc", "repro", env=stack.client_env())
        rows.append(("dvc repro, the stack's MLflow server (auth, artifacts via the proxy)", f"{seconds:.0f} s"))
        stack.configure_dvc_remote(repo=server)
        run(server, "git", "add", "-A")  # dvc.lock and the remote: what a teammate's clone gets
        run(server, "git", "commit", "-q", "-m", "run")
        files = sum(1 for p in (server / ".dvc/cache").rglob("*") if p.is_file())
        rows.append((f"dvc push ({files} cached files)", f"{run(server, BIN / 'dvc', 'push'):.1f} s"))
        clone = root / "clone"
        run(root, "git", "clone", "-q", server, clone)
        stack.configure_dvc_remote(repo=clone)
        rows.append(("dvc pull into a fresh clone", f"{run(clone, BIN / 'dvc', 'pull'):.1f} s"))
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
    rows.print()


class Rows(list):
    """The table, each row also printed (to stderr) as soon as it is measured."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"{row[0]}: {row[1]}", file=sys.stderr, flush=True)
        super().append(row)

    def print(self) -> None:
        width = max(len(k) for k, _ in self)
        print(f"\n{'measure':<{width}}  value\n{'-' * width}  -----")
        for key, value in self:
            print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
