import os

# Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on before triton is first
# imported (importing torch does not import it). On a GPU machine the real kernels run.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import subprocess
from pathlib import Path

import pytest
import torch

from sfpp.models.dit import WanConfig, WanModel

ROOT = Path(__file__).resolve().parents[1]


def _repository_state() -> str | None:
    """`git status` of the checkout (tracked and untracked, ignored files aside), or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def prompt_embeddings_in_a_temporary_folder(tmp_path_factory):
    """Pipelines with umT5 cache prompt embeddings on disk (`sfpp.pipeline.prompt_cache`): never in the user's
    ~/.cache from a test, in subprocesses (the CLI) too."""
    from sfpp.pipeline.prompt_cache import ENV

    old = os.environ.get(ENV)
    os.environ[ENV] = str(tmp_path_factory.mktemp("sfpp-cache"))
    yield
    if old is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = old


@pytest.fixture(scope="session", autouse=True)
def the_tests_leave_the_repository_as_it_was():
    """Nothing a test runs may write into the checkout (shipped models, README, bench/results, ...): the whole
    session is checked against `git status` before and after."""
    before = _repository_state()
    yield
    after = _repository_state()
    if before is not None and after is not None and after != before:
        changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
        pytest.fail(f"the tests changed the repository: {changed[:20]}", pytrace=False)


def require_triton() -> None:
    """Skip the calling test module where Triton kernels cannot run: no GPU and the interpreter off (it is switched
    on above, before triton is first imported, unless TRITON_INTERPRET was set to something else)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)
    pytest.importorskip("triton")


# Small enough for CPU, with every structural feature of Wan2.1: 3 heads of 16 (RoPE split 8/4/4 real dims over
# t/h/w), qk norm across heads, cross-attention norm, patch (1, 2, 2), 16 latent channels.
TEST_CONFIG = WanConfig(
    dim=48,
    ffn_dim=80,
    num_heads=3,
    num_layers=2,
    in_channels=16,
    out_channels=16,
    text_dim=24,
    text_len=10,
    freq_dim=32,
)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter fresh random values (norm weights too), so no term is trivially identity or zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or ".norm" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return module


@pytest.fixture
def cfg() -> WanConfig:
    return TEST_CONFIG


@pytest.fixture
def model(cfg) -> WanModel:
    torch.manual_seed(0)
    return randomize_(WanModel(cfg).eval())
