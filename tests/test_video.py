import numpy as np
import pytest
import torch

from ff_engine.errors import ConfigError
from ff_engine.video import Mp4Writer
from model_adapters.decoders import LatentPreviewDecoder, WanVAEDecoder


def test_wan_vae_decoder_from_a_local_folder(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True])
    vae.save_pretrained(tmp_path / "vae")
    frames = WanVAEDecoder(tmp_path / "vae").decode(torch.randn(3, 16, 4, 6))
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == np.uint8  # 1 + 4 * 2 frames, stride 8
    assert frames.std() > 0
    with pytest.raises(ConfigError, match="VAE path"):
        WanVAEDecoder(tmp_path / "nope")


def test_preview_decoder_frame_counts_and_mp4(tmp_path):
    d = LatentPreviewDecoder()
    a = d.decode(torch.randn(3, 16, 4, 6))
    b = d.decode(torch.randn(3, 16, 4, 6))
    assert a.shape == (9, 32, 48, 3) and b.shape == (12, 32, 48, 3)
    w = Mp4Writer(tmp_path / "x.mp4", fps=16)
    w.write(a)
    w.write(b)
    w.close()
    import av

    with av.open(str(tmp_path / "x.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 21
