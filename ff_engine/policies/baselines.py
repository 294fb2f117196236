"""Baselines on the same interface: H2O, SnapKV, ExpectedAttention, DeepSink, Random, KeyNorm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens, layer_tensors_state, take_layer_state
from ff_engine.policies.future_forcing import FutureForcing, FutureQueryProxy
from ff_engine.policies.params import MAX_POLICY_SEED, param
from ff_engine.policies.window import SinkWindow


def attention_to_cache(q: torch.Tensor, k: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """Mean over queries and heads of softmax(q.k / sqrt d + log m) over the cached keys: [N]."""
    nq, h, d = q.shape
    kk = k.float().repeat_interleave(h // k.shape[1], dim=1)
    out = torch.zeros(k.shape[0], device=k.device)
    for hh in range(h):  # one head at a time keeps memory at O(Nq * N)
        logits = q[:, hh].float() @ kk[:, hh].T / math.sqrt(d) + log_mass.float()[None]
        out += torch.softmax(logits, dim=1).mean(0)
    return out / h


@dataclass
class _QuerySample:
    """Keeps a random sample of the last cache-writing pass's post-RoPE queries per layer."""

    num_queries: int = param(256, ge=1, doc="post-RoPE queries of the last write pass sampled per layer")
    seed: int = param(0, ge=0, le=MAX_POLICY_SEED, doc="seed of the query sample")
    _q: dict = field(default_factory=dict, repr=False)

    def observe(self, layer, q_pre_rope, q, positions):
        g = torch.Generator().manual_seed(self.seed + layer)
        idx = torch.randperm(q.shape[0], generator=g)[: self.num_queries]
        self._q[layer] = q[idx].float()

    def state_dict(self):
        """The last write pass's sampled queries per layer (``q.<layer>``)."""
        return {**super().state_dict(), **layer_tensors_state("q", self._q)}

    def load_state_dict(self, state):
        state = dict(state)
        self._q = take_layer_state("q", state)
        super().load_state_dict(state)


@dataclass
class H2O(_QuerySample, CachePolicy):
    """Heavy hitters: attention accumulated over every block's (sampled) queries since a token was written."""

    name = "h2o"
    _acc: dict = field(default_factory=dict, repr=False)

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        n = tokens.num_tokens
        dev = ctx.cache.device  # the accumulator lives beside the keys it scores
        acc = self._acc.get(ctx.layer, torch.zeros(0, device=dev))
        acc = torch.cat([acc, torch.zeros(n - acc.numel(), device=dev)])
        if ctx.layer in self._q:
            acc = acc + attention_to_cache(self._q[ctx.layer], tokens.k, tokens.log_mass)
        self._acc[ctx.layer] = acc
        return acc

    def on_compact(self, layer, survivors):
        self._acc[layer] = self._acc[layer][survivors]

    def state_dict(self):
        """Sampled queries and the attention accumulated per cached token, in table order (``acc.<layer>``)."""
        return {**super().state_dict(), **layer_tensors_state("acc", self._acc)}

    def load_state_dict(self, state):
        state = dict(state)
        self._acc = take_layer_state("acc", state)
        super().load_state_dict(state)


@dataclass
class SnapKV(_QuerySample, CachePolicy):
    """Attention of the latest block's (sampled) queries, max-pooled over ``kernel`` neighbouring tokens."""

    name = "snapkv"
    # a pooling window wider than a few frames' tokens only blurs scores; the cap keeps the padding small
    kernel: int = param(1, ge=1, le=1024, doc="max-pooling width over neighbouring tokens' scores (1: none)")

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        if ctx.layer not in self._q:
            return tokens.positions[:, 0].float()
        s = attention_to_cache(self._q[ctx.layer], tokens.k, tokens.log_mass)
        if self.kernel > 1:
            s = torch.nn.functional.max_pool1d(s[None, None], self.kernel, 1, self.kernel // 2)[0, 0, : s.numel()]
        return s


@dataclass
class ExpectedAttention(FutureForcing):
    """kvpress Expected Attention: moments of the *post-RoPE* queries of recent blocks, no future rotation,
    no merging, exact scoring of every token."""

    name = "expected-attention"
    merge: str = "none"
    page_candidates: bool = False

    def _make_proxy(self) -> FutureQueryProxy:
        return FutureQueryProxy(1, self.decay, self.window, "cheap", 1, self.covariance, rotate=False)

    def observe(self, layer, q_pre_rope, q, positions):
        self.proxy.update(layer, q)


@dataclass
class DeepSink(SinkWindow):
    """A large frame sink plus a recent window."""

    name = "deep-sink"
    sink_frames: int = 6


@dataclass
class Random(CachePolicy):
    """Random scores from a generator seeded per (block, layer): it keeps no state, so a restored session draws
    the same numbers as an uninterrupted one."""

    name = "random"
    seed: int = param(0, ge=0, le=MAX_POLICY_SEED, doc="seed of the random scores")

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + ctx.newest_frame * 101 + ctx.layer)
        return torch.rand(tokens.num_tokens, generator=g)


@dataclass
class KeyNorm(CachePolicy):
    """kvpress KnormPress: keys with a small norm draw more attention; keep the lowest-norm keys."""

    name = "key-norm"

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        return -tokens.k.float().norm(dim=-1).mean(-1)


