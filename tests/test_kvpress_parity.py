"""Our kvpress baselines against kvpress's own scoring code on the same inputs (no model download).

kvpress presses score inside a transformers attention module: a tiny random Llama attention layer (float64) gives
them the pre-RoPE queries (``q_proj``) and the RoPE (``rotary_emb``); keys and values are random.  Our side sees
the same tensors the way the engine hands them over:
  * RoPE pairs: Llama rotates the two halves of the head dimension together (``rotate_half``), the adapters
    adjacent pairs; ``to_pairs`` permutes the head dimension so that the same rotation acts on adjacent pairs.
    Scores are dot products, which the permutation leaves unchanged.
  * Positions: token ``s`` of the 1D sequence sits at (frame, row, column) of a (gh, gw) grid in raster order,
    and ``LlamaPhases`` is the rope object whose ``phases`` give Llama's angle for ``s`` (the same float32
    product ``LlamaRotaryEmbedding`` computes), so "the next positions in sequence order" is the same list.
kvpress scores per kv head; the paged cache keeps one score per token, the mean over kv heads.
"""

import math

import pytest
import torch

kvpress = pytest.importorskip("kvpress")  # first: without kvpress (and its transformers) the module skips
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from ff_engine.cache import PagedKVCache
from ff_engine.policies import CompressContext, LayerTokens, make_policy

D, HIDDEN = 16, 32
GRID = (2, 3)  # 6 tokens per frame
TPF = GRID[0] * GRID[1]


class LlamaPhases:
    """``RotaryPhases`` reproducing 1D Llama RoPE for (frame, row, column) laid out in raster order."""

    max_frames = None

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.float()

    def phases(self, positions: torch.Tensor) -> torch.Tensor:
        p = positions.long()
        s = p[:, 0] * TPF + p[:, 1] * GRID[1] + p[:, 2]
        return (s.float()[:, None] * self.inv_freq[None]).double()


def to_pairs(x: torch.Tensor) -> torch.Tensor:
    """Head dimension in Llama's half layout -> adjacent-pair layout (pair i = elements i and i + D/2)."""
    return torch.stack([x[..., : D // 2], x[..., D // 2 :]], -1).flatten(-2)


def raster(n: int) -> torch.Tensor:
    s = torch.arange(n)
    return torch.stack([s // TPF, (s % TPF) // GRID[1], s % GRID[1]], 1).to(torch.int32)


class Case:
    """One layer's inputs: a tiny Llama attention, hidden states, keys and values of ``n`` tokens (float32 values
    as the cache stores them, handed to kvpress as float64)."""

    def __init__(self, hq: int, hkv: int, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        cfg = LlamaConfig(
            hidden_size=HIDDEN,
            num_attention_heads=hq,
            num_key_value_heads=hkv,
            head_dim=D,
            num_hidden_layers=1,
            intermediate_size=HIDDEN,
            vocab_size=8,
        )
        self.attn = LlamaAttention(cfg, layer_idx=0).double().requires_grad_(False)
        with torch.no_grad():  # weights large enough that the softmax is far from uniform
            self.attn.q_proj.weight.copy_(torch.randn(hq * D, HIDDEN, generator=g, dtype=torch.float64) * 0.3)
        self.attn.rotary_emb = LlamaRotaryEmbedding(cfg)  # what kvpress attaches to every attention layer
        self.hq, self.hkv, self.n = hq, hkv, n
        self.hidden = torch.randn(1, n, HIDDEN, generator=g, dtype=torch.float64)
        self.k = (torch.randn(1, hkv, n, D, generator=g) * 0.7).double()
        self.v = (torch.randn(1, hkv, n, D, generator=g) * torch.rand(1, hkv, n, 1, generator=g) * 3).double()
        self.cos, self.sin = self.attn.rotary_emb(self.hidden, torch.arange(n)[None])

    def q_pre_rope(self) -> torch.Tensor:  # [1, H, n, D]
        with torch.no_grad():
            return self.attn.q_proj(self.hidden).view(1, self.n, self.hq, D).transpose(1, 2)

    def q_rope(self) -> torch.Tensor:
        return apply_rotary_pos_emb(self.q_pre_rope(), self.q_pre_rope(), self.cos, self.sin)[0]

    def engine_side(self, frames_per_block: int, n_tokens: int | None = None):
        """(cache holding the first ``n_tokens`` tokens in the adapters' layout, its context)."""
        n = self.n if n_tokens is None else n_tokens
        cache = PagedKVCache(1, self.hkv, D, 4, num_pages=64)
        cache.add_session("s", 64)
        k, v = (to_pairs(t[0, :, :n].transpose(0, 1)).float() for t in (self.k, self.v))
        cache.append("s", 0, k, v, raster(n))
        ctx = CompressContext(
            cache.session_view("s", 0),
            budget_tokens=n,
            newest_frame=(n - 1) // TPF,
            frames_per_block=frames_per_block,
            tokens_per_frame=TPF,
            token_grid=GRID,
            rope=LlamaPhases(self.attn.rotary_emb.inv_freq),
        )
        return cache, ctx

    def block_causal_attention(self, block: int) -> torch.Tensor:
        """[1, H, n, n]: every query attends to every key of its own and earlier blocks (the engine's attention)."""
        logits = self.q_rope() @ repeat_kv(self.k, self.hq // self.hkv).transpose(2, 3) / math.sqrt(D)
        b = torch.arange(self.n) // block
        return torch.softmax(logits.masked_fill(b[None, :] > b[:, None], float("-inf")), dim=-1)


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(ours.double(), ref.double(), rtol=1e-5, atol=1e-7 * float(ref.abs().max()))


EA_CASES = [  # (hq, hkv, params)
    (4, 2, {}),  # kvpress's defaults, GQA
    (4, 4, {"n_future_positions": 16}),
    (4, 1, {"n_future_positions": 1, "n_sink": 0, "use_covariance": False}),
    (4, 2, {"n_future_positions": 64, "n_sink": 2, "use_vnorm": False}),
    (4, 2, {"n_future_positions": 200, "use_covariance": False, "epsilon": 0.01}),
]


@pytest.mark.parametrize("hq,hkv,params", EA_CASES)
def test_expected_attention_matches_kvpress(hq, hkv, params):
    """kvpress's ExpectedAttentionPress.score on a 48-token prompt against the policy fed the prompt's pre-RoPE
    queries as one write pass: per kv head, and the token scores (mean over kv heads; sinks at max + 1)."""
    case = Case(hq, hkv, n=48)
    press = kvpress.ExpectedAttentionPress(**params)
    ref = press.score(case.attn, case.hidden, case.k, case.v, None, {})[0]  # [Hkv, n]
    policy = make_policy("expected-attention", **params)
    _, ctx = case.engine_side(frames_per_block=8)
    policy.observe(0, to_pairs(case.q_pre_rope()[0].transpose(0, 1)).float(), None, raster(case.n))
    tokens = LayerTokens.gather(ctx)
    per_head = policy.kv_head_scores(
        tokens.k[press.n_sink :], tokens.v[press.n_sink :], tokens.log_mass[press.n_sink :], *policy.future_moments(ctx)
    )
    assert close(per_head, ref[:, press.n_sink :])
    ours = policy.score(tokens, ctx)
    assert close(ours, ref.mean(0))
    # the rotation matters on these inputs: without it the scores move far beyond the tolerance
    ctx.rope = None
    assert not torch.allclose(policy.score(tokens, ctx).double(), ref.mean(0), rtol=1e-3)


def test_expected_attention_future_positions_follow_the_raster_order():
    """The next positions after frame f: sequence indices (f + 1) tpf, ... as (frame, row, column)."""
    policy = make_policy("expected-attention", n_future_positions=8)
    _, ctx = Case(2, 1, n=12).engine_side(frames_per_block=1)
    want = torch.tensor([[2, 0, 0], [2, 0, 1], [2, 0, 2], [2, 1, 0], [2, 1, 1], [2, 1, 2], [3, 0, 0], [3, 0, 1]])
    assert torch.equal(policy.future_positions(ctx), want.int())


@pytest.mark.parametrize("window,kernel", [(1, 1), (4, 3), (12, 5), (12, 1)])
def test_snapkv_matches_kvpress_on_the_engines_attention(window, kernel):
    """kvpress's SnapKVPress.score handed the attention weights of the engine's block-causal attention (its path
    when the model returns them) against the policy fed the last block's post-RoPE queries.  The window's own
    tokens score above every other token on both sides (kvpress: per-head max + 1; ours: max + 1 of the mean)."""
    case, block = Case(4, 2, n=48), 12
    press = kvpress.SnapKVPress(window_size=window, kernel_size=kernel)
    ref = press.score(case.attn, case.hidden, case.k, case.v, case.block_causal_attention(block), {})[0].mean(0)
    policy = make_policy("snapkv", num_queries=window, kernel=kernel)
    _, ctx = case.engine_side(frames_per_block=block // TPF)
    policy.observe(0, None, to_pairs(case.q_rope()[0, :, -block:].transpose(0, 1)).float(), raster(case.n)[-block:])
    ours = policy.score(LayerTokens.gather(ctx), ctx)
    assert close(ours[:-window], ref[:-window])
    assert bool((ours[-window:] > ours[:-window].max()).all())


def test_snapkv_matches_kvpress_computing_the_window_attention_itself():
    """kvpress's own window attention (queries from ``q_proj``, rotated with the position embeddings, causal
    inside the window) equals the engine's for a one-query window, where causal and block-causal agree."""
    case = Case(4, 2, n=30)
    press = kvpress.SnapKVPress(window_size=1, kernel_size=5)
    kwargs = {"position_embeddings": (case.cos, case.sin)}
    ref = press.score(case.attn, case.hidden, case.k, case.v, None, kwargs)[0].mean(0)
    policy = make_policy("snapkv", num_queries=1, kernel=5)
    _, ctx = case.engine_side(frames_per_block=1)
    policy.observe(0, None, to_pairs(case.q_rope()[0, :, -1:].transpose(0, 1)).float(), raster(case.n)[-1:])
    assert close(policy.score(LayerTokens.gather(ctx), ctx)[:-1], ref[:-1])


def test_h2o_normalised_matches_kvpress_observed_attention():
    """kvpress's ObservedAttentionPress (H2O's mean received attention, causal prefill) against H2O with
    ``normalize`` fed one token per write pass (one-token blocks: block-causal is causal); without ``normalize``
    H2O keeps the sum, i.e. kvpress's mean times the number of queries that saw each token."""
    case = Case(4, 2, n=24)
    ref = (
        kvpress.ObservedAttentionPress()
        .score(case.attn, case.hidden, case.k, case.v, case.block_causal_attention(1), {})[0]
        .mean(0)
    )
    q = to_pairs(case.q_rope()[0].transpose(0, 1)).float()
    for normalize in (True, False):
        policy = make_policy("h2o", normalize=normalize)
        for t in range(1, case.n + 1):
            _, ctx = case.engine_side(frames_per_block=1, n_tokens=t)
            ctx.tokens_per_frame, ctx.token_grid, ctx.newest_frame = 1, (1, 1), t - 1
            policy.observe(0, None, q[t - 1 : t], raster(t)[-1:])
            ours = policy.score(LayerTokens.gather(ctx), ctx)
        seen_by = torch.arange(case.n, 0, -1)
        assert close(ours, ref if normalize else ref * seen_by)
