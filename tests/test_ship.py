"""Shipping is an explicit act: only `ship` writes the shipped models, only from the toy recipe, only into this
checkout, and all or nothing (a failed ship leaves the old models whole). On fabricated smoke-sized runs (random
student weights in the layout the stages write), so no training is needed here."""

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import save_file

import train.ship as ship_module
from sfpp import Pipeline
from sfpp.models.dit import WanModel
from sfpp.models.text import ByteTextEncoder
from train.config import get_recipe
from train.ship import SHIPPED_STAGES, ShipError, ship, ship_all

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under path (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run directory as the stages leave it, with random weights: the smoke recipe renamed to the shipped one."""
    recipe = replace(get_recipe("smoke"), name=ship_module.SHIPPED_RECIPE)
    out = tmp_path_factory.mktemp("run")
    for stage, (_, weights) in ship_module.BY_STAGE.items():
        (out / stage / "final").mkdir(parents=True, exist_ok=True)
        save_file(WanModel(recipe.model).state_dict(), out / stage / "final" / f"{weights}.safetensors")
    (out / "teacher" / "final").mkdir(parents=True, exist_ok=True)
    save_file(ByteTextEncoder(recipe.text).state_dict(), out / "teacher" / "final" / "text.safetensors")
    (out / "eval").mkdir()
    (out / "eval" / "table.md").write_text("| fake | table |\n")
    return recipe, out


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """The shipped models and the README, copied into a stand-in checkout that ship_all writes to instead."""
    models = {}
    for name, path in ship_module.SHIPPED_MODELS.items():
        if path.is_dir():
            shutil.copytree(path, tmp_path / "assets" / name)
        else:
            (tmp_path / "assets" / name).mkdir(parents=True)
            (tmp_path / "assets" / name / "placeholder").write_text("old")
        models[name] = tmp_path / "assets" / name
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{ship_module.README_BEGIN}\nold table\n{ship_module.README_END}\ntail\n")
    monkeypatch.setattr(ship_module, "SHIPPED_MODELS", models)
    monkeypatch.setattr(ship_module, "check_shippable", lambda recipe, checkout=None: None)
    return tmp_path, readme


def test_ship_refuses_other_recipes_and_other_installs(tmp_path):
    with pytest.raises(ShipError, match="come from the 'toy' recipe"):
        ship_module.check_shippable(get_recipe("smoke"))
    with pytest.raises(ShipError, match="not from the git checkout"):
        ship_module.check_shippable(get_recipe("toy"), checkout=tmp_path)  # sfpp is not imported from there
    ship_module.check_shippable(get_recipe("toy"))  # this checkout, its own sfpp: allowed


def test_ship_all_replaces_every_model_and_the_table(fake_run, assets):
    recipe, out = fake_run
    root, readme = assets
    ship_all(recipe, out, readme=readme)
    for name in SHIPPED_STAGES:
        assert Pipeline.from_pretrained(root / "assets" / name).transformer.cfg == recipe.model
    assert "| fake | table |" in readme.read_text() and "old table" not in readme.read_text()
    assert sorted(p.name for p in (root / "assets").iterdir()) == sorted(SHIPPED_STAGES)  # nothing left beside
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "assets"]


@pytest.mark.parametrize("fail_at", [0, 1, 2, "readme"])
def test_a_failed_ship_leaves_the_old_models_whole(fake_run, assets, monkeypatch, fail_at):
    recipe, out = fake_run
    root, readme = assets
    before = {**tree_digest(root / "assets"), **tree_digest(readme)}
    calls = []
    real_card, real_file = ship_module.model_card, ship_module._staged_file

    def card(*args):
        calls.append(1)
        if len(calls) - 1 == fail_at:
            raise KeyboardInterrupt  # an interrupt half way through
        return real_card(*args)

    def staged_file(*args):
        if fail_at == "readme":
            raise OSError("disk full")
        return real_file(*args)

    monkeypatch.setattr(ship_module, "model_card", card)
    monkeypatch.setattr(ship_module, "_staged_file", staged_file)
    with pytest.raises((KeyboardInterrupt, OSError)):
        ship_all(recipe, out, readme=readme)
    assert {**tree_digest(root / "assets"), **tree_digest(readme)} == before
    assert sorted(p.name for p in (root / "assets").iterdir()) == sorted(SHIPPED_STAGES)  # no partial directories
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "assets"]


def test_ship_to_a_directory(fake_run, tmp_path):
    recipe, out = fake_run
    target = ship(recipe, out, tmp_path / "model", stage="dmd")
    assert Pipeline.from_pretrained(target).transformer.cfg == recipe.model
    ship(replace(recipe, window=5, sink=2), out, target, stage="grpo")  # an sfpp model directory is replaced whole
    settings = Pipeline.from_pretrained(target).settings
    assert (settings.window, settings.sink) == (5, 2)  # the student ships with the cache it was trained through
    ship(replace(recipe, window=5, sink=2, inference_cache=(4, 3)), out, target, stage="grpo")
    settings = Pipeline.from_pretrained(target).settings
    assert (settings.window, settings.sink) == (4, 3)  # unless the recipe gives it another to run with
    card = " ".join((target / "MODEL_CARD.md").read_text().split())
    assert "cache of 4 frames after 3 attention-sink frames (the first, kept); it was trained through 5 frames" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ShipError, match="not an sfpp model directory"):
        ship(recipe, out, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    installed = ship_module.PACKAGE
    if installed != ROOT / "sfpp":
        with pytest.raises(ShipError, match="inside the installed sfpp package"):
            ship(recipe, out, installed / "assets" / "mine")
