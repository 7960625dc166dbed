"""Our Wan VAE against diffusers' independent AutoencoderKLWan on the same random weights, and streaming decode."""

import pytest
import torch

from sfpp.models.vae import WanVAE, WanVAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

# Wan2.1's structure (4 levels, 2 residual blocks each, time downsampling in the last two) at base_dim 8.
CFG = WanVAEConfig(base_dim=8)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(CFG).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):  # norm gains away from 1 so that a swapped norm shows
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return vae


@pytest.fixture(scope="module")
def twin(vae):
    ref = diffusers.AutoencoderKLWan(base_dim=CFG.base_dim, z_dim=CFG.z_dim).eval()
    # diffusers' own converter from Wan's original layout: an independent check of our parameter names.
    converted = convert_wan_vae_to_diffusers(dict(vae.state_dict()))
    missing, unexpected = ref.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    return ref


def denormalize(z):
    mean = torch.tensor(CFG.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(CFG.latents_std).view(1, -1, 1, 1, 1)
    return z * std + mean


@torch.no_grad()
def test_encode_matches_diffusers(vae, twin):
    video = torch.rand(2, 3, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours = vae.encode(video)
    assert ours.shape == (2, 16, 3, 4, 6)
    theirs = twin.encode(video).latent_dist.mode()
    torch.testing.assert_close(denormalize(ours), theirs, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_decode_matches_diffusers(vae, twin):
    z = torch.randn(1, 16, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    ours = vae.decode(z)
    assert ours.shape == (1, 3, 13, 32, 48)  # 1 + 4 * 3 frames
    theirs = twin.decode(denormalize(z)).sample
    assert theirs.abs().max() > 0.1  # not a trivially flat output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_streaming_decode_equals_whole_video(vae):
    z = torch.randn(1, 16, 7, 4, 6, generator=torch.Generator().manual_seed(4))
    whole = vae.decode(z)
    for sizes in ([3, 3, 1], [1, 2, 4], [2, 5]):
        stream = vae.stream()
        parts = [stream.decode_pixels(chunk) for chunk in z.split(sizes, dim=2)]
        counts = [p.shape[2] for p in parts]
        assert counts == [1 + 4 * (sizes[0] - 1)] + [4 * s for s in sizes[1:]]  # pixels as soon as a chunk is in
        torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-5, atol=1e-5)
    # Fewer latent frames per decoder call (less activation memory): the same frames.
    torch.testing.assert_close(vae.stream(frames_per_call=1).decode_pixels(z), whole, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_uint8_frames_and_bad_input(vae):
    z = torch.randn(2, 16, 2, 4, 6)
    frames = vae.stream().decode(z)
    assert frames.shape == (2, 5, 32, 48, 3) and frames.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"latents must be \[batch, 16"):
        vae.stream().decode(torch.randn(1, 8, 2, 4, 6))
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))


def test_save_and_load(vae, tmp_path):
    vae.save(tmp_path)
    loaded = WanVAE.from_meta(vae.to_meta(), tmp_path)
    assert loaded.cfg == CFG
    z = torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z))
