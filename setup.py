"""sfpp's install. The CUDA C++ ops (csrc/, built through CMakeLists.txt into sfpp/kernels/_cuda_ops) are compiled
when nvcc, cmake and pybind11 are present and skipped with a message otherwise; SFPP_BUILD_CUDA=1 forces the build
(failing loudly), SFPP_BUILD_CUDA=0 skips it. SFPP_CUDA_ARCHS picks the architectures (default "80;90a")."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
# The version is written once, in sfpp/__init__.py (`sfpp --version` prints it).
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "sfpp" / "__init__.py").read_text(), re.M).group(1)


def _why_no_cuda_build() -> str | None:
    """None when the CUDA ops can be built here, else the reason."""
    if not shutil.which("nvcc") and not os.environ.get("CUDACXX"):
        return "nvcc not found (set CUDACXX or put nvcc on PATH)"
    if not shutil.which("cmake"):
        return "cmake not found"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed in the build environment"
    return None


def _cuda_extensions() -> list[Extension]:
    mode = os.environ.get("SFPP_BUILD_CUDA", "auto")
    reason = "SFPP_BUILD_CUDA=0" if mode == "0" else _why_no_cuda_build()
    if reason is None:
        return [Extension("sfpp.kernels._cuda_ops", sources=[])]
    if mode == "1":
        raise RuntimeError(f"SFPP_BUILD_CUDA=1 but the CUDA ops cannot be built: {reason}")
    print(f"sfpp: skipping the CUDA C++ ops ({reason}); the triton and torch backends remain", file=sys.stderr)
    return []


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        archs = os.environ.get("SFPP_CUDA_ARCHS", "80;90a")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]  # fmt: skip
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)], check=True)


setup(
    name="sfpp",
    version=VERSION,
    description="Streaming autoregressive video diffusion: Self-Forcing++ on a Wan2.1 DiT",
    python_requires=">=3.10",
    # Only the sfpp namespace is installed: train/ and bench/ run from the checkout (`python -m train`, `python -m
    # bench...`), since bare top-level names like theirs belong to other packages on the index.
    packages=find_packages(include=["sfpp", "sfpp.*"]),
    package_data={"sfpp": ["assets/**/*", "engine/dispatch_table.json", "cli/page.html"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "av", "aiohttp>=3.9"],  # aiohttp: sfpp serve
    extras_require={
        # triton: the kernels' CPU tests run them in Triton's interpreter; pybind11/cmake: the CUDA build test
        "test": [
            *["pytest", "diffusers>=0.35", "transformers", "pytest-benchmark", "tokenizers"],
            *["ruff", "import-linter>=2.1"],  # CI's linters: style, and the floors (pyproject.toml)
            "peft",  # the LoRA merge's test oracle
            *["triton", "pybind11", "cmake"],
            *["opencv-python-headless", "matplotlib"],  # the training stack's smoke tests
            "flashdreams==0.1.0",  # its TAEHV: the tiny decoder's test oracle (pure Python; pulls boto3, loguru, tyro)
            "playwright",  # drives a system Chromium in sfpp serve's browser test (never downloads browsers)
        ],
        "gpu": ["triton", "pybind11"],
        "train": ["opencv-python-headless", "matplotlib"],  # optical flow (reward, metrics), evaluation plots
    },
    ext_modules=_cuda_extensions(),
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["sfpp=sfpp.cli:main"]},
)
