"""sfpp: streaming autoregressive video diffusion (Self-Forcing++ on a Wan2.1 DiT)."""

from sfpp.cache import RingKVCache
from sfpp.model import CONFIGS, WanConfig, WanModel, get_config
from sfpp.pipeline import DECODERS, Pipeline, PipelineOutput, StreamSettings
from sfpp.sampler import FlowMatchSchedule
from sfpp.toy import PatchPCACodec
from sfpp.video import export_to_video

DECODERS["patch-pca"] = PatchPCACodec

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
