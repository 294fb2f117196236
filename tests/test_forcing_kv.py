"""Forcing-KV (``forcing-kv``) against the reference's own scoring, recorded in tests/fixtures/forcing_kv (README
there: commit, function, settings), and in the engine on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_engine import tiny_model

from ff_engine.cache import PagedKVCache
from ff_engine.engine import Engine, SessionConfig
from ff_engine.policies import CompressContext, LayerTokens, make_policy
from ff_engine.policies.forcing_kv import ForcingKV, segment_similarity

FIXTURE = Path(__file__).parent / "fixtures" / "forcing_kv" / "forcing_kv_reference.safetensors"
FPB = 3  # the reference's block


def load_cases():
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
        cases = json.loads(meta["cases"])
        for i, c in enumerate(cases):
            c.update({name: f.get_tensor(f"{i}.{name}") for name in
                      ("keys", "values", "patch_scores", "keep_indices", "dynamic_k", "dynamic_v")})
    return meta, cases


META, CASES = load_cases()


def raster(frames: torch.Tensor, grid) -> torch.Tensor:
    """(frame, h, w) of every token of ``frames``, raster order inside a frame."""
    h, w = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    hw = torch.stack([h.flatten(), w.flatten()], 1)
    return torch.cat([torch.cat([torch.full((hw.shape[0], 1), int(f)), hw], 1) for f in frames]).to(torch.int32)


def layer_with(case, sink: int, layers: int = 1, keys_layer: int = 0, seed: int = 0):
    """A cache whose layer ``keys_layer`` holds ``sink`` random sink frames, then the case's T recent frames and its
    new block (frames sink .. sink + T + 2); other layers hold random keys.  Context for layer 0, budget = the
    reference's sizes (sink + T + dynamic_context_length frames)."""
    grid, k, v = case["grid"], case["keys"], case["values"]
    tpf = grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    frames = sink + case["temporal_frames"] + FPB
    cache = PagedKVCache(layers, k.shape[1], k.shape[2], 4, num_pages=256)
    cache.add_session("s", 256)
    pos = raster(torch.arange(frames), grid)
    for layer in range(layers):
        if layer == keys_layer:
            kk = torch.cat([torch.randn(sink * tpf, *k.shape[1:], generator=g), k])
            vv = torch.cat([torch.randn(sink * tpf, *v.shape[1:], generator=g), v])
        else:
            kk, vv = torch.randn(frames * tpf, *k.shape[1:], generator=g), torch.randn(frames * tpf, *v.shape[1:])
        cache.append("s", layer, kk, vv, pos)
    budget = (sink + case["temporal_frames"] + case["dynamic_context_length"]) * tpf
    ctx = CompressContext(cache.session_view("s", 0), budget_tokens=budget, newest_frame=frames - 1, frames_per_block=FPB,
                          tokens_per_frame=tpf, token_grid=tuple(grid))
    return cache, ctx


def policy_for(case, sink: int, score_layer: int = -1) -> ForcingKV:
    return make_policy("forcing-kv", sink_frames=sink, recent_frames=case["temporal_frames"],
                       num_frame_patch=case["num_frame_patch"], score_layer=score_layer)


def test_fixture_records_the_reference():
    assert META["commit"] == "50ac1f454348e7f0a2e54bde71e1652b20c09fe6"
    assert META["function"].endswith("CausalWanSelfAttention.dynamic_compression")
    assert FIXTURE.stat().st_size < 1_000_000 and len(CASES) == 5


@pytest.mark.parametrize("i", range(len(CASES)))
@pytest.mark.parametrize("sink", [0, 1])
def test_segment_scores_and_kept_segments_match_the_reference(i, sink):
    """Our segment similarities equal the reference's ``patch_scores`` (1e-5) and compressing to the reference's
    budget keeps exactly its dynamic cache (the ``keep_indices`` segments, keys and values) besides the sink and
    the T recent frames."""
    case = CASES[i]
    _, ctx = layer_with(case, sink)
    policy = policy_for(case, sink)
    ours = policy.segment_scores(LayerTokens.gather(ctx), ctx)
    assert ours.shape == case["patch_scores"].shape
    assert float((ours - case["patch_scores"]).abs().max()) < 1e-5

    tpf, t = ctx.tokens_per_frame, case["temporal_frames"]
    scores = policy.score(LayerTokens.gather(ctx), ctx)
    seg_of = torch.arange(FPB * tpf) // tpf * case["num_frame_patch"] + torch.arange(FPB * tpf) % tpf * \
        case["num_frame_patch"] // tpf  # flat segment index of each candidate token
    cand = scores[sink * tpf: (sink + FPB) * tpf]
    assert torch.allclose(cand, -case["patch_scores"].flatten()[seg_of], atol=1e-5)

    policy.compress(ctx)
    kept = LayerTokens.gather(ctx)
    p = kept.positions.long()
    order = torch.argsort(p[:, 0] * tpf + p[:, 1] * case["grid"][1] + p[:, 2])  # compaction may reorder
    p, k, v = p[order], kept.k[order], kept.v[order]
    f = p[:, 0]
    assert kept.num_tokens == ctx.budget_tokens
    assert int((f < sink).sum()) == sink * tpf  # the sink
    assert torch.equal(f[-t * tpf:], torch.arange(sink + FPB, sink + FPB + t).repeat_interleave(tpf))  # recent
    dyn = (f >= sink) & (f < sink + FPB)  # the reference's dynamic cache: its chunks in index order
    assert torch.allclose(k[dyn], case["dynamic_k"], atol=1e-6)
    assert torch.allclose(v[dyn], case["dynamic_v"], atol=1e-6)
    kept_segments = torch.unique(seg_of[(f[dyn] - sink) * tpf + p[dyn, 1] * case["grid"][1] + p[dyn, 2]])
    assert torch.equal(kept_segments, case["keep_indices"])


def test_every_layer_uses_the_scoring_layers_selection():
    """``score_layer=1`` (the reference: layer 1 scores, the other layers reuse its chunks): layer 0, compressed
    first, keeps the segments layer 1's keys select; ``score_layer=-1`` scores layer 0 with its own keys."""
    case = CASES[0]
    cache, ctx = layer_with(case, sink=1, layers=3, keys_layer=1)
    shared = policy_for(case, 1, score_layer=1)
    for layer in range(3):
        lctx = CompressContext(cache.session_view("s", layer), ctx.budget_tokens, ctx.newest_frame, FPB, ctx.tokens_per_frame,
                               ctx.token_grid)
        shared.compress(lctx)
    tpf = ctx.tokens_per_frame
    for layer in range(3):
        lt = LayerTokens(CompressContext(cache.session_view("s", layer), 0, ctx.newest_frame, FPB, tpf, ctx.token_grid))
        f = lt.positions[:, 0]
        cand = lt.positions[(f >= 1) & (f < 1 + FPB)].long()
        got = sorted(((p[0] - 1) * case["num_frame_patch"] + (p[1] * case["grid"][1] + p[2]) * case[
            "num_frame_patch"] // tpf).item() for p in cand)
        assert sorted(set(got)) == case["keep_indices"].tolist()
    own = policy_for(case, 1, score_layer=-1)
    _, ctx0 = layer_with(case, sink=1, layers=3, keys_layer=1)
    assert not torch.allclose(own.segment_scores(LayerTokens.gather(ctx0), ctx0), case["patch_scores"], atol=1e-3)


def test_segment_similarity_without_pairs_and_uneven_segments():
    keys = torch.randn(3, 5, 2, 4)
    present = torch.ones(3, 5, dtype=torch.bool)
    present[1, :3] = False  # segment 0 of frame 1: no pair with frame 0 nor with frame 2
    s = segment_similarity(keys, present, 2)  # segments of 3 and 2 tokens: raster * 2 // 5
    assert s.shape == (2, 2) and torch.isnan(s[0, 0]) and torch.isnan(s[1, 0]) and not torch.isnan(s[:, 1]).any()
    flat = keys.flatten(2)
    want = torch.nn.functional.cosine_similarity(flat[0, 3:], flat[1, 3:], dim=-1).mean()
    assert torch.allclose(s[0, 1], want)


def test_forcing_kv_runs_in_the_engine_within_its_budget():
    """The reference's sizes on a tiny random Wan: budget = sink 1 + recent 1 + dynamic 1 frames; every layer stays
    within it after each block and keeps the sink and the newest frame whole."""
    m = tiny_model()
    geo = m.geometry
    tpf, layers = geo.tokens_per_frame, geo.num_layers
    policy = make_policy("forcing-kv", sink_frames=1, recent_frames=1, num_frame_patch=3)
    e = Engine(m, num_pages=400, page_size=4, backend="torch")
    s = e.add_session(SessionConfig(prompt=torch.randn(3, 256), num_frames=12, policy=policy, budget_frames=3))
    blocks = compressed = 0
    while s.id in e.sessions:
        e.step([s.id])
        e.cache.check_invariants()
        if s.id not in e.sessions:
            break
        blocks += 1
        for layer in range(layers):
            n = e.cache.num_tokens(s.id, layer)
            pos = e.cache.gather(s.id, layer)["positions"]
            newest = int(pos[:, 0].max())
            if newest + 1 > 3:  # past the budget: compressed
                assert n <= 3 * tpf
                compressed += 1
                assert int((pos[:, 0] == 0).sum()) == tpf and int((pos[:, 0] == newest).sum()) == tpf
    assert blocks >= 2 and compressed > 0
