"""The CUDA C++ ops (csrc/): they compile with nvcc for sm_80 and sm_90 through CMakeLists.txt (no GPU needed, so
this runs on the CPU machine), the module imports and reports CUDA errors as exceptions, the Philox of
csrc/philox.cuh is the torch reference's bit for bit (run as host code), and on a GPU both ops equal their torch
references. Skipped with the reason where nvcc, cmake or pybind11 is missing."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfpp import ops
from sfpp.cache import RingKVCache
from sfpp.model import WanConfig, rope_table

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _missing() -> str | None:
    if not shutil.which("nvcc"):
        return "nvcc not found: the CUDA C++ build test needs the CUDA toolkit"
    if not shutil.which("cmake"):
        return "cmake not found"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 not installed"
    return None


@pytest.fixture(scope="module")
def cuda_ops(tmp_path_factory):
    """csrc built from scratch into a temporary folder, for sm_80 and sm_90, and imported."""
    if reason := _missing():
        pytest.skip(reason)
    import pybind11

    build = tmp_path_factory.mktemp("csrc_build")
    archs = "80;90" if not torch.cuda.is_available() else f"{''.join(map(str, torch.cuda.get_device_capability()))}"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]  # fmt: skip
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (path,) = build.glob("_cuda_ops*.so")
    spec = importlib.util.spec_from_file_location("_cuda_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_ops_build_for_sm80_sm90_and_import(cuda_ops):
    assert callable(cuda_ops.noise_step) and callable(cuda_ops.cache_write)
    if not torch.cuda.is_available():  # a launch without a device is an exception, not a crash
        params = dict(x=0, flow=None, sigma_val=0.5, sigma_next_val=0.3, x_next=0, numel=8, frame_size=1, frames=1,
                      sample_size=1, seed=1, counter0=0, dtype=0)  # fmt: skip
        with pytest.raises(RuntimeError, match="sfpp noise_step"):
            cuda_ops.noise_step(params, 0)


def test_philox_header_matches_the_torch_reference(tmp_path):
    """csrc/philox.cuh compiled as host code: its words equal `philox4x32_ref` for 64-bit counters and seeds."""
    if not shutil.which("nvcc"):
        pytest.skip("nvcc not found")
    cases = [(0, 0), (1, 7), (2**32 + 5, 2**40 + 3), (123456789, 0xDEADBEEFCAFE)]
    src = tmp_path / "kat.cu"
    src.write_text(
        '#include <cstdio>\n#include "philox.cuh"\nint main() {\n'
        + "".join(
            f"  {{ uint32_t c[4] = {{{c & 0xFFFFFFFF}u, {c >> 32}u, 0u, 0u}}; "
            f"sfpp::philox4x32_10(c, {s & 0xFFFFFFFF}u, {s >> 32}u); "
            'std::printf("%u %u %u %u\\n", c[0], c[1], c[2], c[3]); }\n'
            for c, s in cases
        )
        + "}\n"
    )
    exe = tmp_path / "kat"
    subprocess.run(["nvcc", "-I", str(ROOT / "csrc"), "-o", str(exe), str(src)], check=True, capture_output=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    for (counter, seed), line in zip(cases, lines, strict=False):
        ref = ops.philox4x32_ref(torch.tensor([counter]), seed)
        assert [int(x) for x in line.split()] == [int(w) for w in ref]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_noise_step_matches_reference(cuda_ops, monkeypatch, dtype):
    monkeypatch.setattr(ops, "cuda_extension", lambda: cuda_ops)
    x = torch.randn(2, 16, 3, 30, 52, device="cuda").to(dtype)
    flow = torch.randn_like(x)
    for sigma, sigma_next in [(0.9, 0.6), (0.0, torch.rand(2, 3, device="cuda"))]:
        x0, x_next = ops.noise_step(x, flow, sigma, sigma_next, 2**33 + 1, 4 * 1000, backend="cuda")
        ref_x0, ref_next = ops.noise_step_ref(x, flow, sigma, sigma_next, 2**33 + 1, 4 * 1000)
        torch.testing.assert_close(x0, ref_x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x_next, ref_next, rtol=1e-5, atol=1e-5)
        _, tri_next = ops.noise_step(x, flow, sigma, sigma_next, 2**33 + 1, 4 * 1000, backend="triton")
        torch.testing.assert_close(x_next, tri_next, rtol=1e-5, atol=1e-5)  # one stream across backends


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_cache_write_matches_reference(cuda_ops, monkeypatch, dtype, fp8):
    monkeypatch.setattr(ops, "cuda_extension", lambda: cuda_ops)
    cfg = WanConfig(dim=1536, num_heads=12, num_layers=1)
    height, width, frames = 6, 10, 3
    tables = [t.cuda() for t in rope_table(cfg)]
    kv_dtype = torch.float8_e4m3fn if fp8 else dtype
    caches = [RingKVCache(cfg, batch_size=2, frame_tokens=height * width, window=4, sink=1, dtype=dtype,
                          kv_dtype=kv_dtype, device="cuda") for _ in range(2)]  # fmt: skip
    norm = [(1 + 0.3 * torch.randn(cfg.dim, device="cuda")).to(dtype) for _ in range(2)]
    for _ in range(3):  # wraps the 4-frame window
        q, k, v = (2 * torch.randn(2, frames * height * width, cfg.dim, device="cuda").to(dtype) for _ in "qkv")
        outs = []
        for backend, cache in zip(("cuda", "torch"), caches, strict=True):
            plan = cache.plan(2, frames, height * width)
            outs.append(ops.cache_write(q, k, v, *norm, *tables, plan.frame_pos, plan.token_index, *cache.layer(0),
                                        height, width, cfg.rope_split, cfg.eps, backend=backend))  # fmt: skip
            cache.advance(frames)
        step = 2**-3 if fp8 else (1e-6 if dtype == torch.float32 else 2**-7)
        torch.testing.assert_close(
            outs[0].float(), outs[1].float(), rtol=2 * (1e-6 if dtype == torch.float32 else 2**-7), atol=1e-5
        )
        for a, b in zip(caches[0].layer(0), caches[1].layer(0), strict=True):
            if a is not None:
                torch.testing.assert_close(a.float(), b.float(), rtol=step, atol=2**-9 if fp8 else 1e-5)
