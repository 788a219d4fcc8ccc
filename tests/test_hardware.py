"""Device and precision resolution, with the capability checks patched to each kind of machine."""

from __future__ import annotations

import logging

import pytest
import torch

from cnnlab.config import RuntimeParams
from cnnlab.training import hardware
from cnnlab.training.hardware import CpuFeatures, resolve_device, resolve_precision, resolve_runtime, runtime_of

AVX2 = CpuFeatures(avx2=True, avx512=False, avx512_bf16=False, amx=False, capability="AVX2")
AVX512_BF16 = CpuFeatures(avx2=True, avx512=True, avx512_bf16=True, amx=False, capability="AVX512")
AMX = CpuFeatures(avx2=True, avx512=True, avx512_bf16=False, amx=True, capability="AVX512")
CPU = torch.device("cpu")


@pytest.fixture
def cpu_kind(monkeypatch: pytest.MonkeyPatch):
    def use(features: CpuFeatures) -> None:
        monkeypatch.setattr(hardware, "cpu_features", lambda: features)
    return use


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """A CUDA machine as torch would report it; ``bf16`` says whether the GPU supports bf16."""
    def use(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    return use


def test_cpu_without_native_bf16_resolves_to_fp32(cpu_kind):
    cpu_kind(AVX2)
    precision, why = resolve_precision("auto", CPU)
    assert precision == "fp32" and "no native bf16" in why


@pytest.mark.parametrize("features", [AVX512_BF16, AMX], ids=["avx512_bf16", "amx"])
def test_cpu_with_native_bf16_resolves_to_bf16(cpu_kind, features):
    cpu_kind(features)
    assert resolve_precision("auto", CPU)[0] == "bf16"


def test_explicit_bf16_on_an_emulating_cpu_is_kept_with_a_warning(cpu_kind, caplog):
    caplog.set_level(logging.INFO, logger="cnnlab")
    cpu_kind(AVX2)
    assert resolve_precision("bf16", CPU)[0] == "bf16"
    warned = [r for r in caplog.records if r.name.startswith("cnnlab") and "emulates it" in r.getMessage()]
    assert warned and all(r.levelno == logging.WARNING for r in warned)
    caplog.clear()
    cpu_kind(AVX512_BF16)
    assert resolve_precision("bf16", CPU)[0] == "bf16"
    assert [r.getMessage() for r in caplog.records] == []


def test_explicit_fp32_is_kept_everywhere(cpu_kind, gpu):
    cpu_kind(AVX512_BF16)
    assert resolve_precision("fp32", CPU)[0] == "fp32"
    gpu(bf16=True)
    assert resolve_precision("fp32", torch.device("cuda"))[0] == "fp32"


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_cuda_auto_is_bf16_where_supported_else_fp16(gpu, bf16, expected):
    gpu(bf16=bf16)
    assert resolve_precision("auto", torch.device("cuda"))[0] == expected


def test_cuda_bf16_on_a_gpu_without_it_is_refused(gpu):
    gpu(bf16=False)
    with pytest.raises(ValueError, match="does not support it"):
        resolve_precision("bf16", torch.device("cuda"))


def test_mps_auto_is_fp32():
    assert resolve_precision("auto", torch.device("mps"))[0] == "fp32"


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(hardware, "mps_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    gpu(bf16=True)
    assert resolve_device("auto").type == "cuda"


def test_a_missing_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="Metal backend is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_device("tpu")


def test_runtime_on_cuda_sets_tf32_and_tags_it(gpu, monkeypatch):
    gpu(bf16=True)
    calls = []
    monkeypatch.setattr(hardware, "set_tf32", calls.append)
    rt = resolve_runtime(device="auto", precision="auto", tf32=False)
    assert (rt.device.type, rt.precision, rt.tf32) == ("cuda", "bf16", False) and calls == [False]
    tags = rt.tags()
    assert tags["runtime.gpu"] == "Test GPU" and tags["runtime.tf32"] == "false"
    assert "Test GPU" in rt.describe() and "TF32 off" in rt.describe()


def test_runtime_on_cpu_describes_and_tags_what_it_resolved(cpu_kind, monkeypatch):
    cpu_kind(AVX2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    rt = resolve_runtime(device="auto", precision="auto", channels_last=True)
    assert (rt.device.type, rt.precision, rt.tf32) == ("cpu", "fp32", False)
    tags = rt.tags()
    assert tags["runtime.device"] == "cpu" and tags["runtime.precision"] == "fp32"
    assert tags["runtime.threads"] == str(torch.get_num_threads()) and tags["runtime.cpu_capability"] == "AVX2"
    assert "runtime.gpu" not in tags
    assert f"{torch.get_num_threads()} threads" in rt.describe() and "channels_last" in rt.describe()


def test_cpu_features_match_what_torch_reports():
    f = hardware.cpu_features()
    assert f.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert f.amx == torch.cpu._is_amx_tile_supported()
    assert f.native_bf16 == (f.avx512_bf16 or f.amx)


def test_runtime_of_resolves_a_params_section_and_its_device_override(gpu, monkeypatch):
    gpu(bf16=True)
    monkeypatch.setattr(hardware, "set_tf32", lambda enabled: None)
    section = RuntimeParams(precision="fp32", channels_last=False, device="cuda", tf32=True)
    rt = runtime_of(section)
    assert (rt.device.type, rt.precision, rt.channels_last, rt.tf32) == ("cuda", "fp32", False, True)
    rt = runtime_of(section, device="cpu")
    assert (rt.device.type, rt.precision, rt.channels_last, rt.tf32) == ("cpu", "fp32", False, False)
