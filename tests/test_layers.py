"""The floors of the code base hold (the import-linter contracts in pyproject.toml, which CI also runs), the
contracts catch a climb, and our names live beside the packages whose top-level names we once shadowed."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
needs_linter = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    # lint-imports finds the packages on sys.path: the tree under test first, so a copy is linted, not the install
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [LINT, "--config", str(root / "pyproject.toml"), "--no-cache"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=300)


@needs_linter
def test_the_floors_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


# (file, an import that climbs out of its floor, where in the file it goes); the first, unchanged, is the control
CLIMBS = [
    ("sfpp/engine/cache.py", "", "unchanged"),
    ("sfpp/engine/cache.py", "from sfpp.pipeline import Pipeline", "top"),  # engine -> pipeline
    ("sfpp/kernels/reference.py", "import sfpp", "top"),  # the package root re-exports the pipeline
    ("sfpp/models/dit.py", "    from sfpp.cli import main", "in a function"),  # a lazy import counts too
    ("sfpp/engine/stream.py", "from sfpp.models.dit import WanModel", "top"),
    ("sfpp/cli/serve.py", "from sfpp.cli import generate", "top"),  # commands import options.py, not each other
    ("sfpp/pipeline/settings.py", "import train.world", "top"),  # the package never imports train/
    ("sfpp/video.py", "from bench import common", "top"),
]


@needs_linter
@pytest.mark.parametrize("path,line,where", CLIMBS, ids=[c[0] for c in CLIMBS])
def test_a_climb_breaks_the_contract(tmp_path, path, line, where):
    tree = tmp_path / "tree"
    for part in ("sfpp", "train", "bench"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("assets", "results", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    target = tree / path
    source = target.read_text()
    if where == "top":
        source += f"\n{line}  # noqa\n"
    elif where == "in a function":
        source += f"\n\ndef _climb():\n{line}  # noqa\n"
    target.write_text(source)
    result = _lint(tree)
    if where == "unchanged":  # the copy itself is linted, and kept
        assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:]
    else:
        assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-3000:]


def test_no_importlib_to_reach_our_own_modules():
    """Imports between our floors are plain import statements, which the contracts see."""
    for path in (ROOT / "sfpp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and "import_module" in ast.unparse(node.func):
                raise AssertionError(f"{path.relative_to(ROOT)}: {ast.unparse(node)}")


def test_no_imports_in_the_model_hot_path():
    """The DiT's functions run per chunk: each of their imports would be a dictionary lookup under the import lock."""
    tree = ast.parse((ROOT / "sfpp" / "models" / "dit.py").read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            assert not any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(fn)), f"import in {fn.name}"


def test_importing_sfpp_loads_neither_triton_nor_dynamo():
    """A script may still switch Triton's interpreter on after `import sfpp` (Triton binds it at its own import)."""
    probe = "import sys, sfpp; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]
    assert getattr(torch.compiler.assume_constant_result(lambda: 0), "_dynamo_marked_constant", False)  # ops' marker


def test_our_names_do_not_shadow_other_packages():
    """From the checkout root (on sys.path, as under pytest and `python -m`), Hugging Face's `kernels` and
    diffusers' Wan modules import next to ours: no top-level package of ours takes a name of the index's."""
    probe = (
        "import sfpp, sfpp.kernels.reference, sfpp.engine.ops\n"
        "try:\n    import kernels\nexcept ImportError:\n    kernels = None\n"
        "print(None if kernels is None else kernels.__file__)\n"
        "try:\n    from diffusers import AutoencoderKLWan, WanTransformer3DModel\nexcept ImportError:\n    pass\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = result.stdout.split()[-1]
    assert found == "None" or Path(found).resolve().parents[1] != ROOT, found  # a package, not the checkout's folder
    assert not (ROOT / "kernels").exists()
    # Installed, only the sfpp namespace is ours: train/ and bench/ are not importable away from the checkout.
    probe = "import importlib.util as u\nfor n in ('train', 'bench'):\n    print(getattr(u.find_spec(n), 'origin', 0))"
    installed = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr[-2000:]
    for origin in installed.stdout.split():
        assert origin == "0" or Path(origin).resolve().parents[1] != ROOT, origin  # (CI's venv is inside ROOT)
