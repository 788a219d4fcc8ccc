"""How the data stages scale with the data: Fashion-MNIST at several sizes and a generated photo folder.

    .venv/bin/python bench/data_scale.py                                  # 2,000 and 20,000 images + photos
    .venv/bin/python bench/data_scale.py --sizes 2000 20000 70000         # 70,000: every image (caps null)
    .venv/bin/python bench/data_scale.py --sizes --photos 10:80:400       # photos only: 10 classes of 80-400

Each case is a small copy of the project (bench/project_copy.py) in a temporary folder, run the
way a user runs it: ``dvc repro download``, ``split``, ``augment`` one after another, each timed
as a whole command (DVC's own work included), then a no-op ``dvc repro augment`` (median of 3),
then one epoch of ``scratch@scratch`` with its memory sampled: peak RSS (GNU time's %M), and the
peak of its anonymous memory (``RssAnon``, polled every 20 ms), which is what the process holds
of its own. The training set is memory-mapped from the decode cache, so the pages of it the epoch
touched count in RSS as file pages the kernel can drop, not in RssAnon. Per case it prints the
images/s of split and augment, the decode cache's build time for the training images (from its
``.json``), the bytes of data/ and DVC's cache against the source's bytes (a hard-linked file counts
once, as it takes disk once), and the file count under ``data/split`` + ``data/augmented``.
Nothing here asserts a timing: run it on an idle machine and quote the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from photo_folder import make_photo_folder
from project_copy import copy_project, project_params, tool_argv, tool_env

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA = ("data/raw", "data/split", "data/augmented", "data/cache")


def run(ws: Path, *cmd: str) -> float:
    """Seconds ``cmd`` took in ``ws``; stops the benchmark with its output if it failed."""
    t0 = time.perf_counter()
    done = subprocess.run(tool_argv(cmd), cwd=ws, env=tool_env(ws), capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {ws}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def _anon_kib(pid: int) -> int:
    """RssAnon of ``pid`` and its descendants, in KiB (0 for what has gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def peak_memory_mib(ws: Path, *cmd: str) -> tuple[float, float]:
    """(peak RSS of the largest process ``cmd`` waited for, GNU time's %M; peak RssAnon summed over
    the command's processes, polled every 20 ms), in MiB."""
    out = ws / "time.txt"
    proc = subprocess.Popen(tool_argv(("/usr/bin/time", "-f", "%M", "-o", str(out), *tool_argv(cmd))), cwd=ws,
                            env=tool_env(ws), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    anon = 0
    while proc.poll() is None:
        anon = max(anon, _anon_kib(proc.pid))
        time.sleep(0.02)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {ws}:\n{proc.stderr.read()[-2000:]}")
    return int(out.read_text().split()[-1]) / 1024, anon / 1024


def size_of(*paths: Path) -> tuple[int, int]:
    """(bytes, files) under ``paths``; a hard-linked file counts once, as it takes disk once."""
    seen, total, files = set(), 0, 0
    for p in (p for path in paths if path.exists() for p in path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, files


def measure(ws: Path, name: str, source_bytes: int) -> dict:
    times = {stage: run(ws, "dvc", "repro", stage) for stage in ("download", "split", "augment")}
    noop = statistics.median(run(ws, "dvc", "repro", "augment") for _ in range(3))
    split = json.loads((ws / "data/metrics/split.json").read_text())
    augment = json.loads((ws / "data/metrics/augment.json").read_text())
    written = split["train_images"] + split["val_images"] + split["test_images"]
    copies = augment["augmented_images"]
    work = size_of(*(ws / d for d in DATA))[0]
    cache = size_of(ws / ".dvc/cache")[0]
    both = size_of(*(ws / d for d in DATA), ws / ".dvc/cache")[0]
    files = size_of(ws / "data/split", ws / "data/augmented")[1]
    decode = [json.loads(p.read_text()) for p in (ws / "data/cache/decoded").glob("split-train-*.json")]
    rss, anon = peak_memory_mib(ws, "dvc", "repro", "scratch@scratch")
    return {"case": name, "train images": split["train_images"], "split s": times["split"],
            "split img/s": written / times["split"], "augment s": times["augment"],
            "augment img/s": copies / times["augment"],
            "download s": times["download"], "data / source": work / source_bytes,
            "cache / source": cache / source_bytes, "data + cache / source": both / source_bytes, "files": files,
            "no-op repro s": noop, "decode train s": sum(d["seconds"] for d in decode),
            "scratch peak RSS MiB": rss, "scratch peak anon MiB": anon}


def fashion_case(root: Path, n_train: int) -> tuple[Path, int]:
    per_class = None if n_train >= 60_000 else n_train // 10
    caps = {"max_train_per_class": per_class} | ({} if per_class else {"max_val_per_class": None,
                                                                       "max_test_per_class": None})
    ws = copy_project(root / f"fmnist_{n_train}", project_params(split=caps, scratch={"epochs": 1}))
    return ws, sum(p.stat().st_size for p in FASHION_MNIST.glob("*-ubyte.gz"))


def photo_case(root: Path, spec: str) -> tuple[Path, int]:
    k, lo, hi = (int(x) for x in spec.split(":"))
    ws = copy_project(root / "photos", project_params(download={"source": "local", "local_dir": "data/local"},
                                                      scratch={"epochs": 1}))
    counts = {f"c{i:02d}": round(lo + i * (hi - lo) / max(1, k - 1)) for i in range(k)}
    made = make_photo_folder(ws / "data/local", counts, seed=0)
    return ws, made["bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[2000, 20000],
                    help="Fashion-MNIST training images per case (70000 or more: every image)")
    ap.add_argument("--photos", default="10:80:400", help="CLASSES:MIN:MAX of the photo folder; '' to skip")
    ap.add_argument("--keep", type=Path, help="keep the workspaces here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnlab-scale-") as tmp:
        root = args.keep or Path(tmp)
        cases = [(f"Fashion-MNIST {n:,}", lambda n=n: fashion_case(root, n)) for n in args.sizes]
        if args.photos:
            cases.append((f"photos {args.photos}", lambda: photo_case(root, args.photos)))
        for i, (name, make) in enumerate(cases):
            print(f"{name}: running", file=sys.stderr, flush=True)
            ws, source_bytes = make()
            row = measure(ws, name, source_bytes)
            if i == 0:
                print("| " + " | ".join(row) + " |\n|" + "---|" * len(row))
            print("| " + " | ".join(_cell(v) for v in row.values()) + " |", flush=True)  # a row as each case ends


def _cell(v: object) -> str:
    return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


if __name__ == "__main__":
    main()
