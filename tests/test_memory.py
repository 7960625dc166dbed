"""The memory model of one stream (sfpp.pipeline.memory) against what the real code allocates on the meta device,
and the pipeline's memory modes that act on it."""

from dataclasses import replace

import pytest
import torch

from sfpp.engine.cache import RingKVCache
from sfpp.models.dit import WanModel, get_config
from sfpp.models.taehv import TAEHVDecoder
from sfpp.models.vae import WanVAE, WanVAEConfig
from sfpp.pipeline import Pipeline
from sfpp.pipeline.memory import GiB, dit_parameters, measure_on_meta, memory_plan, table

FP8 = torch.float8_e4m3fn
WAN13 = get_config("wan2.1-1.3b")


@pytest.mark.parametrize(
    "cfg",
    [
        get_config("tiny"),
        WAN13,
        get_config("wan2.1-14b"),
        replace(WAN13, qk_norm=False, cross_attn_norm=False, num_layers=3),
    ],
    ids=["tiny", "1.3b", "14b", "no-norms"],
)
def test_dit_parameters_in_closed_form_equal_the_model(cfg):
    with torch.device("meta"):
        model = WanModel(cfg)
    assert dit_parameters(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "config,batch,window,sink,kv_dtype",
    [("wan2.1-1.3b", 1, 21, 0, None), ("wan2.1-1.3b", 2, 9, 3, FP8), ("wan2.1-14b", 1, 21, 0, FP8)],
)
def test_kv_term_is_the_ring_cache_s_buffers(config, batch, window, sink, kv_dtype):
    cfg = get_config(config)
    plan = memory_plan(cfg, batch_size=batch, window=window, sink=sink, kv_dtype=kv_dtype)
    kv = {} if kv_dtype is None else {"kv_dtype": kv_dtype}
    cache = RingKVCache(cfg, batch_size=batch, frame_tokens=(480 // 16) * (832 // 16), window=window, sink=sink,
                        dtype=torch.bfloat16, device="meta", **kv)  # fmt: skip
    assert plan.kv_cache == pytest.approx(cache.nbytes, rel=1e-3)


def _wan_vae(base_dim: int = 96) -> WanVAE:
    with torch.device("meta"):
        return WanVAE(WanVAEConfig(base_dim=base_dim))


def _taehv() -> TAEHVDecoder:
    with torch.device("meta"):
        return TAEHVDecoder()


@pytest.mark.parametrize(
    "args,decoder",
    [
        (dict(decoder="wan-vae"), "wan-vae"),
        (dict(decoder="wan-vae", decoder_frames_per_call=1, kv_dtype=FP8), "wan-vae"),
        (dict(decoder="taehv"), "taehv"),
        (
            dict(
                decoder="wan-vae", vae_base_dim=32, height=240, width=416, batch_size=2, sink=3, window=9, kv_dtype=FP8
            ),
            "wan-vae-32",
        ),  # fmt: skip
    ],
    ids=["vae", "vae-per-frame-fp8", "taehv", "small-batch2"],
)
def test_plan_matches_the_meta_device_measurement(args, decoder):
    """The full 1.3B stream at 832x480 (and a second size, batch and VAE width) on the meta device: weights and ring
    exactly, a chunk's and the decoder's transient memory within 15% (they are modelled, not counted)."""
    module = {"wan-vae": lambda: _wan_vae(), "wan-vae-32": lambda: _wan_vae(32), "taehv": _taehv}[decoder]()
    args = {"cfg": WAN13, **args, "decoder_params": sum(p.numel() for p in module.parameters())}
    measured = measure_on_meta(args, chunks=2, decoder_module=module)
    plan = memory_plan(**args).parts()
    assert plan["dit_weights"] == measured["dit_weights"]
    assert plan["decoder_weights"] == measured["decoder_weights"]
    assert plan["kv_cache"] == pytest.approx(measured["kv_cache"], rel=1e-3)
    for part in ("chunk_activations", "decoder_state", "decoder_activations"):
        assert plan[part] == pytest.approx(measured[part], rel=0.15), part
    assert measured["chunk_activations"] > 0 and measured["decoder_activations"] > 0  # the measurement saw them


def test_the_readme_table_meets_the_targets():
    """Wan2.1-1.3B at 832x480, window 21: the low mode within 12 GB beside a CUDA context, bf16 KV within 16 GB."""
    rows = {line.split(" | ")[0].strip("| "): line for line in table().splitlines()[2:]}
    peak_gb = {name: float(line.strip(" |").split(" | ")[-1]) for name, line in rows.items()}
    assert peak_gb["low: fp8 KV, VAE per latent frame"] <= 12 - 0.6
    assert peak_gb["low: bf16 KV, VAE per latent frame"] <= 16 - 0.6
    assert peak_gb["full"] > 16  # umT5-XXL on the GPU and the VAE decoding whole chunks: what the low mode is for
    assert list(peak_gb.values()) == sorted(peak_gb.values(), reverse=True)  # each saving saves


# ----------------------------------------------------------------------------------------- the memory modes


def _tiny_vae_pipeline(**options) -> Pipeline:
    pipe = Pipeline.from_config("tiny", memory="full", **options)
    torch.manual_seed(1)
    pipe.set_decoder(WanVAE(WanVAEConfig(base_dim=8)))
    return pipe


def test_low_mode_applies_every_saving_and_keeps_the_video():
    pipe = _tiny_vae_pipeline()
    want = pipe("a red ball", num_frames=9, seed=3, progress=False).frames
    before = pipe.memory_plan()
    done = pipe.fit_memory("low")
    assert done == ["the VAE decoding one latent frame per call", "an fp8 KV cache"]  # prompts: on the CPU already
    assert pipe.decoder.frames_per_call == 1 and pipe.kv_dtype == FP8
    after = pipe.memory_plan()
    assert after.decoder_activations < before.decoder_activations and after.kv_cache < before.kv_cache
    pipe.kv_dtype = None  # fp8 changes the numbers; one latent frame per decoder call changes only float rounding
    got = pipe("a red ball", num_frames=9, seed=3, progress=False).frames
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # a pixel value at a rounding edge, 1e-5 apart


def test_auto_mode_stops_once_the_plan_fits():
    pipe = _tiny_vae_pipeline()
    whole = pipe.memory_plan()
    pipe.decoder.frames_per_call = 1
    per_frame = pipe.memory_plan()
    pipe.decoder.frames_per_call = None
    assert per_frame.peak < whole.peak  # the decoder's call is the largest transient at this size
    assert pipe.fit_memory("auto", budget=whole.peak) == []
    assert pipe.fit_memory("auto", budget=per_frame.peak) == ["the VAE decoding one latent frame per call"]
    assert pipe.kv_dtype is None
    assert pipe.fit_memory("auto", budget=0) == ["an fp8 KV cache"]  # the rest, and no more than that
    assert pipe.fit_memory("full") == [] and pipe.fit_memory("low") == []


def test_a_given_kv_dtype_is_kept():
    pipe = _tiny_vae_pipeline(kv_dtype=torch.float32)
    assert "an fp8 KV cache" not in pipe.fit_memory("low", kv_dtype_given=True)
    assert pipe.kv_dtype == torch.float32


def test_a_bad_memory_mode_is_one_line():
    with pytest.raises(ValueError, match=r"memory must be one of \['auto', 'low', 'full'\], got 'small'"):
        Pipeline.from_config("tiny", memory="small")


def test_oom_error_names_the_plan_and_the_low_mode():
    pipe = _tiny_vae_pipeline()
    err = pipe._oom_error(RuntimeError("CUDA out of memory"), 2, 64, 64)
    assert "memory='low'" in str(err) and "--memory low" in str(err) and "GiB" in str(err)
    assert f"{pipe.memory_plan(2, 64, 64).peak / GiB:.2f} GiB" in str(err)


def test_cli_memory_flag_reaches_the_pipeline_and_the_table_prints(capsys):
    from sfpp.cli import _parser, main
    from sfpp.cli.options import load_pipeline

    tiny = ["generate", "-p", "a red ball", "--config", "tiny", "--device", "cpu"]
    assert load_pipeline(_parser().parse_args([*tiny, "--memory", "low"])).kv_dtype == FP8
    args = _parser().parse_args(tiny)
    assert args.memory is None and load_pipeline(args).kv_dtype is None  # auto changes nothing on a CPU
    assert main(["memory", "--window", "9"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| mode |") and len(out.splitlines()) == 2 + 5
    with pytest.raises(SystemExit, match="2"):
        main(["generate", "-p", "x", "--memory", "small"])
    assert "--memory: invalid choice: 'small'" in capsys.readouterr().err


def test_the_readme_quotes_the_table():
    from pathlib import Path

    assert table() in (Path(__file__).parents[1] / "README.md").read_text()
