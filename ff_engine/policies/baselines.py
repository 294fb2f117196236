"""Baselines on the same interface: H2O, SnapKV, PostRopeExpectedAttention, DeepSink, Random, KeyNorm.

SnapKV and H2O with ``normalize`` compute what kvpress's SnapKVPress and ObservedAttentionPress compute (checked
against kvpress in tests/test_kvpress_parity.py); kvpress's Expected Attention is ``expected_attention.py``."""

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
    _, h, d = q.shape
    kk = k.float().repeat_interleave(h // k.shape[1], dim=1)
    out = torch.zeros(k.shape[0], device=k.device)
    for hh in range(h):  # one head at a time keeps memory at O(Nq * N)
        logits = q[:, hh].float() @ kk[:, hh].T / math.sqrt(d) + log_mass.float()[None]
        out += torch.softmax(logits, dim=1).mean(0)
    return out / h


@dataclass
class _LastPassQueries:
    """Keeps some of the last cache-writing pass's post-RoPE queries per layer (``pick`` says which)."""

    _q: dict = field(default_factory=dict, init=False, repr=False)

    def pick(self, layer: int, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, layer, q_pre_rope, q, positions):
        self._q[layer] = self.pick(layer, q).float()

    def state_dict(self):
        """The last write pass's kept queries per layer (``q.<layer>``)."""
        return {**super().state_dict(), **layer_tensors_state("q", self._q)}

    def load_state_dict(self, state):
        state = dict(state)
        self._q = take_layer_state("q", state)
        super().load_state_dict(state)


@dataclass
class _QuerySample(_LastPassQueries):
    """Keeps a random sample of the last cache-writing pass's post-RoPE queries per layer."""

    num_queries: int = param(256, ge=1, doc="post-RoPE queries of the last write pass sampled per layer")
    seed: int = param(0, ge=0, le=MAX_POLICY_SEED, doc="seed of the query sample")

    def pick(self, layer, q):
        g = torch.Generator().manual_seed(self.seed + layer)
        return q[torch.randperm(q.shape[0], generator=g)[: self.num_queries]]


def _grown(per_layer: dict, layer: int, n: int, device) -> torch.Tensor:
    """``per_layer[layer]`` (a per-token tensor in table order) padded with zeros for the tokens appended since."""
    old = per_layer.get(layer, torch.zeros(0, device=device))
    return torch.cat([old, torch.zeros(n - old.numel(), device=device)])


@dataclass
class H2O(_QuerySample, CachePolicy):
    """Heavy hitters: attention accumulated over every block's (sampled) queries since a token was written.  With
    ``normalize`` the mean over the blocks that scored a token instead: kvpress's ObservedAttentionPress (the mean
    attention a token received) when every query is kept (``num_queries`` >= a block's tokens)."""

    name = "h2o"
    normalize: bool = param(False, doc="mean over the blocks that scored a token, not the sum (kvpress observed)")
    _acc: dict = field(default_factory=dict, init=False, repr=False)
    _count: dict = field(default_factory=dict, init=False, repr=False)

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        n, layer = tokens.num_tokens, ctx.layer
        dev = ctx.view.device  # the accumulators live beside the keys they score
        acc = _grown(self._acc, layer, n, dev)
        count = _grown(self._count, layer, n, dev) if self.normalize else None
        if layer in self._q:
            acc = acc + attention_to_cache(self._q[layer], tokens.k, tokens.log_mass)
            count = None if count is None else count + 1
        self._acc[layer] = acc
        if count is None:
            return acc
        self._count[layer] = count
        return acc / count.clamp_min(1)

    def on_compact(self, layer, survivors):
        self._acc[layer] = self._acc[layer][survivors]
        if layer in self._count:
            self._count[layer] = self._count[layer][survivors]

    def state_dict(self):
        """Sampled queries, the attention accumulated per cached token in table order (``acc.<layer>``) and, with
        ``normalize``, how many blocks scored each token (``count.<layer>``)."""
        return {**super().state_dict(), **layer_tensors_state("acc", self._acc),
                **layer_tensors_state("count", self._count)}

    def load_state_dict(self, state):
        state = dict(state)
        self._acc, self._count = take_layer_state("acc", state), take_layer_state("count", state)
        super().load_state_dict(state)


@dataclass
class SnapKV(_LastPassQueries, CachePolicy):
    """kvpress SnapKVPress: the attention the last ``num_queries`` queries of the latest write pass (the
    observation window, kvpress ``window_size``) pay each older cached token, averaged over the window and the
    heads, then average-pooled over ``kernel`` neighbouring tokens (kvpress ``kernel_size``, zero padding); the
    window's own tokens (the newest) score the maximum + 1.  The window's queries attend to the whole cache, their
    own block included (block-causal attention: the weights kvpress reads from the model when it has them)."""

    name = "snapkv"
    num_queries: int = param(64, ge=1, doc="the observation window: the write pass's last queries (kvpress window_size)")
    # a pooling window wider than a few frames' tokens only blurs scores; the cap keeps the padding small
    kernel: int = param(5, ge=1, le=1024, doc="average-pooling width over neighbouring tokens' scores (1: none)")

    def pick(self, layer, q):
        return q[-self.num_queries:]

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        if ctx.layer not in self._q:
            return tokens.positions[:, 0].float()
        q = self._q[ctx.layer]
        older = tokens.num_tokens - q.shape[0]  # the window's own tokens are the table's newest
        s = attention_to_cache(q, tokens.k, tokens.log_mass)
        if older <= 0:
            return torch.ones_like(s)
        pooled = s[:older]
        if self.kernel > 1:  # an even width pads one more on the left (kvpress takes odd widths only)
            pooled = torch.nn.functional.avg_pool1d(pooled[None, None], self.kernel, 1, self.kernel // 2)[0, 0, :older]
        return torch.cat([pooled, (pooled.max() + 1).expand(s.numel() - older)])


@dataclass
class PostRopeExpectedAttention(FutureForcing):
    """Expected Attention on moments of the *post-RoPE* queries of recent blocks, no future rotation, no merging,
    exact scoring of every token.  Not what kvpress computes (pre-RoPE moments rotated to the next positions:
    ``expected-attention``); kept under its own name because earlier results were measured with it."""

    name = "expected-attention-post-rope"
    merge: str = "none"
    page_candidates: bool = False
    sink_frames: int = 0  # as measured (Future Forcing's sink default came later)

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


