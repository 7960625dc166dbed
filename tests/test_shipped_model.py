"""The shipped model draws what the README's example prompts say, measured by the fidelity metric against the world
the prompt describes (objects present with their colour, size and speed), not judged by eye."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sfpp.pipeline import Pipeline
from train.metrics import chunk_seam, fidelity
from train.world import parse_prompt

README = Path(__file__).resolve().parent.parent / "README.md"
FRAMES = 24  # four teacher horizons
SEEDS = (0, 1, 2)
MIN_FIDELITY = 0.2  # the world's own frames score 0.83; no objects, or objects of other colours, score 0
# Chunk seams: the shipped students measure 1.3 over the evaluation prompts and 1.5-1.6 on the README's (issue 20
# wants 1.15; the first students, with a 12-frame teacher horizon, measured 1.2-1.4); an ODE regression on the wrong
# context layout measured 2.0 (train/stages.py, ODEStage.step).
MAX_SEAM = 1.75


def readme_prompts() -> list[str]:
    """Every quoted prompt in the README written in the world's grammar (elided ones, "a big red circle ...", are
    not)."""
    prompts = []
    for text in re.findall(r'"([^"]+)"', README.read_text()):
        try:
            parse_prompt(text)
        except ValueError:
            continue
        if text not in prompts:
            prompts.append(text)
    return prompts


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained("default")


def test_readme_has_prompts_to_check():
    assert len(readme_prompts()) >= 3, "the README's example prompts are what this file checks"


@pytest.mark.parametrize("prompt", readme_prompts())
def test_readme_prompt_is_drawn(pipe, prompt):
    spec = parse_prompt(prompt)
    video = pipe([prompt] * len(SEEDS), num_frames=FRAMES, seed=0, progress=False).frames.numpy()  # [S, T, H, W, 3]
    scores = [fidelity(v, spec) for v in video]
    assert np.mean(scores) >= MIN_FIDELITY, f"fidelity {np.round(scores, 3).tolist()} for {prompt!r}"
    seams = [chunk_seam(v, pipe.settings.frames_per_chunk) for v in video]
    assert np.mean(seams) <= MAX_SEAM, f"chunk seam {np.round(seams, 2).tolist()} for {prompt!r}"


def test_fidelity_tells_a_wrong_prompt(pipe):
    """The check above can fail: the video of one prompt scored against a prompt with other colours."""
    drawn = "a big red circle moving fast and a small blue square moving slowly over a striped grey background"
    other = parse_prompt("a big green circle moving fast and a small yellow square moving slowly over a striped grey "
                         "background")  # fmt: skip
    video = pipe([drawn] * len(SEEDS), num_frames=FRAMES, seed=0, progress=False).frames.numpy()
    assert np.mean([fidelity(v, other) for v in video]) < 0.1
