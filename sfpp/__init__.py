"""sfpp: streaming autoregressive video diffusion (Self-Forcing++ on a Wan2.1 DiT).

The floors, each importing only those below it (the import-linter contract in pyproject.toml): `sfpp.kernels`
(Triton kernels and their torch references) < `sfpp.engine` (ring cache, dispatch, sampler, chunk runner, streams)
< `sfpp.models` (Wan DiT, text encoders, decoders, checkpoint layouts) < `sfpp.video` < `sfpp.pipeline` <
`sfpp.benchmark` < `sfpp.cli`. This file re-exports the public names.
"""

from sfpp.engine.cache import RingKVCache
from sfpp.engine.sampler import FlowMatchSchedule
from sfpp.models.dit import CONFIGS, WanConfig, WanModel, get_config
from sfpp.pipeline import Pipeline, PipelineOutput, StreamSettings
from sfpp.video import export_to_video

__all__ = [
    "CONFIGS",
    "FlowMatchSchedule",
    "Pipeline",
    "PipelineOutput",
    "RingKVCache",
    "StreamSettings",
    "WanConfig",
    "WanModel",
    "export_to_video",
    "get_config",
]
__version__ = "0.1.0"
