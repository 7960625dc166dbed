from setuptools import find_packages, setup

setup(
    name="sfpp",
    version="0.1.0",
    description="Streaming autoregressive video diffusion: Self-Forcing++ on a Wan2.1 DiT",
    python_requires=">=3.10",
    packages=find_packages(include=["sfpp", "sfpp.*", "kernels", "kernels.*", "train", "train.*"]),
    package_data={"sfpp": ["assets/**/*"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "av"],
    extras_require={
        "test": ["pytest", "diffusers>=0.35", "transformers", "ruff", "pytest-benchmark", "tokenizers"],
        "gpu": ["triton"],
    },
    entry_points={"console_scripts": ["sfpp=sfpp.cli:main"]},
)
