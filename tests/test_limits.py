"""``plan --limits``: the arithmetic of the physical limit per block, checked by hand and against PyTorch's own
FLOP counter on a real forward pass."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ff_engine.cli import main
from ff_engine.errors import ConfigError
from ff_engine.limits import GPUS, BlockCost, GpuSpec, block_cost, limits, stream_limits
from model_adapters import registry
from model_adapters.causal_wan import PRESETS, CausalWanModel


class _DenseCacheAttention:
    """The block attends to ``cached`` random cached tokens per layer and to itself (as the engine's cache does)."""

    def __init__(self, cached: int, hkv: int, d: int):
        g = torch.Generator().manual_seed(0)
        self.k, self.v = torch.randn(cached, hkv, d, generator=g), torch.randn(cached, hkv, d, generator=g)

    def __call__(self, layer, q, k, v, q_pre_rope, positions):
        kk, vv = torch.cat([self.k, k]), torch.cat([self.v, v])
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1))
        return out.transpose(0, 1)


def test_forward_flops_match_pytorchs_flop_counter_on_a_real_forward():
    """The formula counts the matmuls of self-attention, cross-attention and FFN; the counter sees every matmul of
    the real forward (patch embedding, time MLPs and head too): the formula is a lower bound within a few %."""
    cfg = PRESETS["wan-tiny"].with_(dim=128, ffn_dim=512, num_heads=2, num_layers=2, text_len=8, latent_hw=(8, 12))
    model = CausalWanModel(cfg).eval()
    g = cfg.geometry()
    n, cached = g.tokens_per_frame * g.frames_per_block, 240
    lat = torch.randn(1, g.frames_per_block, cfg.in_dim, *cfg.latent_hw)
    prompt = model.encode_prompt(torch.randn(cfg.text_len, cfg.text_dim))
    attn = _DenseCacheAttention(cached, g.num_kv_heads, g.head_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward(lat, torch.full((1, g.frames_per_block), 500.0), [prompt], [10], attn)
    counted, formula = counter.get_total_flops(), registry.forward_flops(cfg, n, cached)
    assert formula <= counted <= 1.06 * formula, (formula, counted)


def test_block_cost_by_hand():
    cfg = PRESETS["wan-1.3b"]
    g = cfg.geometry()
    cost = block_cost(cfg, g, lambda n, c: 1000 * n + c, cached_tokens=100, page_size=32, dtype_bytes=2,
                      weight_bytes_per_pass=7)
    assert cost.passes == len(cfg.sample_steps) + 1 == 5
    assert cost.query_tokens == 1560 * 3
    assert cost.flops == 5 * (1000 * 4680 + 100)
    pages = 4  # 100 tokens in pages of 32
    assert cost.kv_bytes == 5 * 30 * pages * 2 * 32 * 12 * 128 * 2  # passes x layers x pages x K,V x bytes
    assert cost.weight_bytes == 35


def test_stream_limits_by_hand():
    spec = GpuSpec("toy", 10**9, hbm_bandwidth=100.0, bf16_flops=1000.0, source="made up")
    cost = BlockCost(passes=2, query_tokens=1, cached_tokens=1, flops=500, kv_bytes=10, weight_bytes=20)
    r = stream_limits(cost, spec, pixel_frames_per_block=12, fps=16)
    assert r["compute_seconds"] == 0.5 and r["memory_seconds"] == 0.3
    assert r["block_seconds_min"] == 0.5 and r["bound_by"] == "compute" and r["fps_max"] == 24
    assert r["real_time_streams_compute"] == 1  # 0.75 s of video per block: 750 FLOPs, 500 each
    assert r["real_time_streams_bandwidth"] == 5  # 75 bytes in 0.75 s, 20 of them weights, 10 per stream


def test_wan_limits_are_bounds_that_shrink_with_the_cache():
    cfg = PRESETS["wan-1.3b"]
    flops = lambda n, c: registry.forward_flops(cfg, n, c)
    r = limits(cfg, cfg.geometry(), flops, GPUS["H100"], budgets=[6, 21, None], seconds=60.0,
               weight_bytes=registry.param_count(cfg) * 2)
    six, twentyone, unbounded = r["rows"]
    assert r["latent_frames"] == 240 and unbounded["cached_tokens"] == 120 * 1560  # mean of a growing cache
    assert six["block_seconds_min"] < twentyone["block_seconds_min"] < unbounded["block_seconds_min"]
    assert six["real_time_streams_max"] >= twentyone["real_time_streams_max"] >= unbounded["real_time_streams_max"]
    assert "not a measurement" in r["kind"] and "data sheet" in r["source"]
    h200 = limits(cfg, cfg.geometry(), flops, GPUS["H200"], budgets=[21], seconds=60.0)["rows"][0]
    assert h200["memory_streams"] > twentyone["memory_streams"]  # more HBM, same compute


def test_plan_limits_cli(capsys):
    assert main(["plan", "--limits", "--json", "--gpu", "H100", "--budgets", "6,unbounded"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert [row["budget_frames"] for row in report["rows"]] == [6, None]
    assert main(["plan", "--limits", "--gpu", "H200"]) == 0
    assert "arithmetic" in capsys.readouterr().out
    for bad in (["--gpu", "A100"], ["--budgets", "6,lots"], ["--budgets", "1"]):
        assert main(["plan", "--limits", *bad]) == 2
        assert "error" in capsys.readouterr().err


def test_an_architecture_without_flops_says_so(monkeypatch):
    import dataclasses

    arch = dataclasses.replace(registry.architecture_of(PRESETS["wan-tiny"]), forward_flops=None)
    monkeypatch.setattr(registry, "architecture_of", lambda cfg: arch)
    with pytest.raises(ConfigError, match="does not state its FLOPs"):
        registry.forward_flops(PRESETS["wan-tiny"], 1, 1)
