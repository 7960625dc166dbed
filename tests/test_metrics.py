"""The evaluation's metrics see what a viewer sees: flicker apart from motion, objects lost, split or frozen, colour
drift; checked on the world's own videos and on the same videos broken in one way at a time."""

import json

import numpy as np
import pytest

from train.evaluate import METRICS, span, summarise, table, video_metrics
from train.evaluate import main as evaluate_main
from train.metrics import colour_drift, object_masks, object_stats, pixel_change
from train.world import COLOURS, SPEEDS, WorldObject, WorldSpec, eval_specs, frames_uint8, render

SPEC = WorldSpec((WorldObject("circle", "red", "big", "fast", (0.3, 0.4), 0.7),), "grey", "plain", None, light=1.0)


def world(spec: WorldSpec = SPEC, frames: int = 24) -> np.ndarray:
    return frames_uint8(render(spec, frames, 32)).numpy()


def test_the_world_scores_as_the_world():
    stats = object_stats(world(), SPEC)
    assert stats["presence"] == 1.0 and stats["blobs"] == 1.0
    assert stats["object_speed"] == pytest.approx(SPEEDS["fast"], rel=0.1)


def test_flicker_is_pixel_change_beside_unchanged_motion():
    clean = world()
    noise = np.random.default_rng(0).integers(-20, 21, clean.shape)
    boiling = np.clip(clean.astype(int) + noise, 0, 255).astype(np.uint8)
    assert pixel_change(boiling) > 3 * pixel_change(clean)
    stats = object_stats(boiling, SPEC)  # the object itself still reads as one blob moving at the world's speed
    assert stats["presence"] > 0.9 and stats["object_speed"] == pytest.approx(SPEEDS["fast"], rel=0.15)
    frozen = np.repeat(clean[:1], len(clean), 0)
    assert pixel_change(frozen) == 0 and object_stats(frozen, SPEC)["object_speed"] == 0


def test_split_lost_and_resized_objects():
    clean = world()
    split = clean.copy()
    red = (np.array(COLOURS["red"]) * 255).astype(np.uint8)
    split[np.roll(object_masks(clean, "red"), (16, 16), axis=(1, 2))] = red  # a copy half a frame away
    assert object_stats(split, SPEC)["blobs"] >= 2 and object_stats(split, SPEC)["presence"] == 0  # wrapped: 2-4 parts
    lost = world(WorldSpec((), "grey", "plain", None, light=1.0))
    assert object_stats(lost, SPEC) == {
        "presence": 0.0,
        "blobs": 0.0,
        "object_speed": pytest.approx(np.nan, nan_ok=True),
    }
    small = world(WorldSpec((WorldObject("circle", "red", "small", "fast", (0.3, 0.4), 0.7),), "grey", "plain",
                            None, light=1.0))  # fmt: skip
    assert object_stats(small, SPEC)["presence"] == 0  # one blob, but a third of the big circle's area


def test_colour_drift():
    clean = world()
    assert colour_drift(clean, clean) == 0
    assert colour_drift(clean[12:], clean[:12]) < 0.15  # the object moving
    darker = (clean * 0.5).astype(np.uint8)
    assert colour_drift(darker, clean) > 0.5


def test_summary_is_relative_to_the_world_on_the_same_prompts():
    specs = eval_specs(0, 3)
    videos = np.stack([world(s, 24) for s in specs])
    noise = np.random.default_rng(1).integers(-30, 31, videos.shape)
    boiling = np.clip(videos.astype(int) + noise, 0, 255).astype(np.uint8)
    runs_world = [video_metrics(videos, specs, 12, 3)]
    runs_model = [video_metrics(boiling, specs, 12, 3)]
    s_world = summarise(runs_world, runs_world, (1, 2))["summary"]
    s_model = summarise(runs_model, runs_world, (1, 2))["summary"]
    assert s_world["pixel_change/world@1x"][0] == pytest.approx(1.0)
    assert s_model["pixel_change/world@2x"][0] > 3
    assert s_model["luminance/world@1x"][0] == pytest.approx(1.0, abs=0.02)
    md = table({"world": {"windows": 2, "summary": s_world}, "boiling": {"windows": 2, "summary": s_model}}, (1, 2))
    assert "| pixel change / world @1x |" in md and "| objects present @2x |" in md and "| boiling | " in md


def test_a_multiple_is_measured_over_the_windows_around_it():
    windows = 25

    def run(speeds: list[float]) -> dict:
        per_window = {m: [1.0] * windows for m in METRICS}
        per_window["object_speed"] = speeds
        return {"windows": windows, "per_window": per_window, "rollout_drift": [0.0], "no_repeat": 1.0}

    speeds = [0.9] + [0.5] * (windows - 1)
    speeds[19] = 3.0  # window 20: an object lost and found again elsewhere reads as a jump
    speeds[20] = float("nan")  # window 21: no object seen in two frames in a row
    world = run([1.0] * windows)
    world["per_window"]["object_speed"][21] = 2.0  # window 22: the world's own fast stretch counts against it
    s = summarise([run(speeds)], [world], (1, 5, 20, 25))["summary"]
    assert s["object_speed/world@1x"][0] == pytest.approx(0.9)  # the first window alone
    assert s["object_speed/world@5x"][0] == pytest.approx(0.5)
    assert s["object_speed/world@20x"][0] == pytest.approx((0.5 * 3 + 3.0) / 4 / ((1.0 * 4 + 2.0) / 5))  # 18..22
    assert s["object_speed/world@25x"][0] == pytest.approx(0.5)  # windows 23..25: the rollout ends at 25
    assert [w + 1 for w in span(60, 60)] == list(range(54, 61))


def test_evaluate_the_shipped_models_and_restamp_their_tables(tmp_path, monkeypatch):
    from train import ship
    from train.config import RECIPES

    evaluate_main(["--shipped", "--out", str(tmp_path), "--prompts", "2", "--seeds", "1", "--multiples", "1,2"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["models"] == "shipped (sfpp/assets)" and "teacher" not in results["results"]
    assert set(results["results"]) == {"world (ground truth)", "Self-Forcing", "Self-Forcing++", "Self-Forcing++ +GRPO"}
    assert (tmp_path / "eval" / "pixel_change.png").is_file() and results["cache"] == "each model's own"
    for bad in (["--multiples", "5,1"], ["--ship-tables"], ["--window", "9"], ["--window", "2", "--sink", "3"],
                ["--shipped", "--ship-tables", "--window", "9", "--sink", "3"]):  # fmt: skip
        with pytest.raises(SystemExit):
            evaluate_main(["--out", str(tmp_path), *bad])
    # Another cache for every student: 3 sink frames and a 3-frame window wrap within the 12 frames rolled out, so
    # the second window's frames differ from those of the models' own 12-frame window.
    sinks = tmp_path / "sinks"
    evaluate_main(["--shipped", "--out", str(sinks), "--prompts", "2", "--seeds", "1", "--multiples", "1,2",
                   "--window", "3", "--sink", "3"])  # fmt: skip
    with_sinks = json.loads((sinks / "eval" / "results.json").read_text())
    assert with_sinks["cache"] == {"window": 3, "sink": 3}
    change = [run["results"]["Self-Forcing++"]["per_seed"][0]["per_window"]["pixel_change"]
              for run in (results, with_sinks)]  # fmt: skip
    assert change[0][0] == pytest.approx(change[1][0]) and change[0][1] != pytest.approx(change[1][1], rel=1e-3)
    # The README's block and each card's evaluation section, from this table (copies: the checkout is not touched).
    cards = {}
    for name, where in ship.SHIPPED_MODELS.items():
        (tmp_path / name).mkdir()
        cards[name] = (where / "MODEL_CARD.md").read_text()
        (tmp_path / name / "MODEL_CARD.md").write_text(cards[name])
    monkeypatch.setattr(ship, "SHIPPED_MODELS", {name: tmp_path / name for name in cards})
    readme = tmp_path / "README.md"
    readme.write_text((ship.CHECKOUT / "README.md").read_text())
    ship.restamp_tables(RECIPES["toy"], tmp_path / "eval", readme=readme)
    table_md = (tmp_path / "eval" / "table.md").read_text()
    assert f"{ship.README_BEGIN}\n{table_md}{ship.README_END}" in readme.read_text()
    for name, old in cards.items():
        new = (tmp_path / name / "MODEL_CARD.md").read_text()
        head = old[: old.index(ship.EVAL_HEADER)]
        assert new.startswith(head) and new.endswith(table_md) and "Pixel change / world" in new


def test_fp8_horizon_gate_bounds_and_noise_floor(tmp_path):
    from train.fp8_horizon import gate
    from train.fp8_horizon import main as fp8_main

    ref = {"luminance": [0.5, 0.5], "pixel_change": [0.01, 0.01], "clipped": [0.01, 0.01]}
    near = {"luminance": [0.51, 0.5], "pixel_change": [0.0102, 0.01], "clipped": [0.012, 0.01]}
    far = {"luminance": [0.5, 0.6], "pixel_change": [0.01, 0.01], "clipped": [0.01, 0.03]}
    assert gate(ref, near, ref, 0.05, 0.005)["passed"]
    failed = gate(ref, far, ref, 0.05, 0.005)
    assert not failed["passed"] and not failed["luminance_ok"] and not failed["clipped_ok"]
    assert failed["pixel_change_ok"]
    assert failed["fp8"]["luminance"] == pytest.approx(0.2) and failed["fp8"]["clipped"] == pytest.approx(0.02)
    assert gate(ref, far, far, 0.05, 0.005)["passed"]  # no further than another seed: invisible in these means
    code = fp8_main(["--out", str(tmp_path), "--prompts", "1", "--multiple", "2"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert code == (0 if result["gate"]["passed"] else 1) and set(result["windows"]) == {
        "reference", "fp8", "reference, seed 1"}  # fmt: skip
    assert len(result["windows"]["fp8"]["luminance"]) == 2 and "| fp8 |" in (tmp_path / "table.md").read_text()
