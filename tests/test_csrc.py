"""The CUDA C++ op (csrc/, the fused cache write): it compiles with nvcc for sm_80 and sm_90a through CMakeLists.txt
(no GPU needed, so this runs on the CPU machine), the module imports and reports CUDA errors as exceptions, and on a
GPU it equals its torch reference, the fp8 cache's rows-contiguous V included. Skipped with the reason where nvcc,
cmake or pybind11 is missing."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfpp.engine import ops
from sfpp.engine.cache import RingKVCache
from sfpp.engine.rope import rope_table
from sfpp.models.dit import WanConfig

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
    """csrc built from scratch into a temporary folder, for sm_80 and sm_90a, and imported."""
    if reason := _missing():
        pytest.skip(reason)
    import pybind11

    build = tmp_path_factory.mktemp("csrc_build")
    archs = "80;90a" if not torch.cuda.is_available() else f"{''.join(map(str, torch.cuda.get_device_capability()))}"
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


def test_cuda_ops_build_for_sm80_sm90a_and_import(cuda_ops):
    assert callable(cuda_ops.cache_write) and not hasattr(cuda_ops, "noise_step")
    if not torch.cuda.is_available():  # a launch without a device is an exception, not a crash
        keys = ["q", "k", "v", "norm_q", "norm_k", "cos", "sin", "frame_pos", "token_index", "k_cache", "v_cache",
                "k_scale", "v_scale", "q_out"]  # fmt: skip
        sizes = ["batch", "length", "heads", "head_dim", "height", "width", "t_half", "h_half", "q_sb", "q_sl", "k_sb",
                 "k_sl", "v_sb", "v_sl", "c_sb", "c_sl", "c_sh", "cv_sb", "cv_sl", "cv_sh", "cv_sd", "s_sb", "s_sl",
                 "o_sb", "o_sl"]  # fmt: skip
        params = {key: None for key in keys} | {key: 2 for key in sizes} | {"eps": 1e-6, "dtype": 0}
        with pytest.raises(RuntimeError, match="sfpp cache_write"):
            cuda_ops.cache_write(params, 0)


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
