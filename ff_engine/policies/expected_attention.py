"""Expected Attention as kvpress computes it (``kvpress.ExpectedAttentionPress``, kvpress 0.5.5).

kvpress scores a cached token by the attention the next queries are expected to pay it:
  1. mean ``mu`` and covariance ``Sigma`` (population, over the queries) of the *pre-RoPE* queries the press is
     handed, leaving out the first ``n_sink`` of them;
  2. ``Rbar`` = the mean of the RoPE rotations of the next ``n_future_positions`` sequence positions after the
     last cached token; ``mu_f = Rbar mu``, ``Sigma_f = Rbar Sigma Rbar^T``;
  3. per query head, a softmax over the cached keys (all but the first ``n_sink``) of
     ``k.mu_f / sqrt d + k^T Sigma_f k / (2 d)`` (``use_covariance``: the quadratic term);
  4. averaged over the query heads of each kv group (GQA), then ``(score + epsilon) * ||v||`` (``use_vnorm``);
  5. the first ``n_sink`` tokens score the maximum + 1, so they are never evicted.

How the engine's setting maps onto kvpress (each difference is forced by the setting; nothing else differs):
  * Which queries: kvpress is handed the prompt at prefill, or in decoding (``DecodingPress``) the hidden states
    since its last compression.  The engine compresses after every block, so the statistics are those of the
    latest cache-writing pass, its first ``n_sink`` queries left out as kvpress leaves out the first rows of what
    it is handed.
  * Sequence order: token ``s`` of a stream sits at (frame, row, column) = ``(s // tpf, (s % tpf) // gw, s % gw)``,
    the raster order the adapters write in.  The future positions are the ``n_future_positions`` indices after
    the newest cached frame, rotated with the adapter's 3D RoPE at their (frame, row, column): with kvpress's
    default 512 and a 1560-token Wan frame, the top third of the next frame.  Future Forcing instead averages
    over every position of the next ``horizon`` frames (and merges); that is the comparison this policy exists for.
  * RoPE pairs: the adapters rotate adjacent pairs (``RotaryPhases``), kvpress's Llama rotation pairs the two
    halves (``rotate_half``): the same rotation up to a permutation of the head dimension, which scores do not see.
  * One score per token: kvpress keeps its own top-k per kv head; a paged cache keeps or evicts a token in every
    head at once, so a token's score is kvpress's per-kv-head score (``kv_head_scores``) averaged over kv heads.
  * The attention bias ``log m`` of merged tokens is added to the logits as attention adds it; no policy merges
    under this one, so it is 0.
``tests/test_kvpress_parity.py`` runs kvpress's own ``score`` on the same statistics, keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ff_engine.errors import SnapshotError
from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens, layer_tensors_state, take_layer_state
from ff_engine.policies.future_proxy import FutureQueryProxy, pair_matrix
from ff_engine.policies.params import param


@dataclass
class ExpectedAttention(CachePolicy):
    """kvpress Expected Attention: pre-RoPE query moments of the latest block rotated to the next
    ``n_future_positions`` positions in sequence order, covariance term, value norm (see the module)."""

    name = "expected-attention"
    # angles of every future position are materialised ([n, head_dim / 2] float64): the cap bounds that at 32 MiB
    n_future_positions: int = param(512, ge=1, le=65536, doc="future positions the RoPE rotation is averaged over")
    n_sink: int = param(4, ge=0, doc="first tokens never evicted; first queries of a pass left out of the statistics")
    use_covariance: bool = param(True, doc="add the query covariance term k^T Sigma_f k / (2 d)")
    use_vnorm: bool = param(True, doc="rescale scores by the value norm: (score + epsilon) * ||v||")
    epsilon: float = param(0.0, ge=0, doc="added to the scores before the value-norm rescaling")
    _mu: dict = field(default_factory=dict, init=False, repr=False)
    _cov: dict = field(default_factory=dict, init=False, repr=False)

    def observe(self, layer, q_pre_rope, q, positions):
        """kvpress's ``get_query_statistics`` on the pass's pre-RoPE queries [N, H, D]: mean and population
        covariance of all but the first ``n_sink``, float64 on the queries' device.  A pass of ``n_sink`` queries
        or fewer keeps the previous statistics (kvpress would divide by zero)."""
        qs = q_pre_rope[self.n_sink :].double()
        if qs.shape[0] == 0:
            return
        mu = qs.mean(0)
        self._mu[layer] = mu
        if self.use_covariance:
            centred = qs - mu
            self._cov[layer] = torch.einsum("nhd,nhe->hde", centred, centred) / qs.shape[0]

    def future_positions(self, ctx: CompressContext) -> torch.Tensor:
        """(frame, row, column) [n_future_positions, 3] int32 of the sequence indices after the newest cached
        frame; frames past a RoPE table of ``max_frames`` are clamped to its last frame (as Future Forcing does)."""
        tpf, gw = ctx.tokens_per_frame, ctx.token_grid[1]
        s = torch.arange(self.n_future_positions) + (ctx.newest_frame + 1) * tpf
        frame = s // tpf
        max_frames = getattr(ctx.rope, "max_frames", None)
        if max_frames is not None:
            frame = frame.clamp(max=max_frames - 1)
        return torch.stack([frame, (s % tpf) // gw, s % gw], 1).to(torch.int32)

    def future_moments(self, ctx: CompressContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """kvpress's ``apply_avg_rope``: (mu_f [H, D], Sigma_f [H, D, D] or None) float64 on the cache's device;
        without a RoPE (``ctx.rope`` None) the moments are used as they are."""
        dev = ctx.view.device
        mu, cov = self._mu[ctx.layer].to(dev), self._cov.get(ctx.layer)
        cov = None if cov is None else cov.to(dev)
        if ctx.rope is None:
            return mu, cov
        angles = ctx.rope.phases(self.future_positions(ctx)).to(dev)  # the adapter's RoPE table is on the CPU
        rbar = pair_matrix(torch.cos(angles).mean(0), torch.sin(angles).mean(0))
        mu_f = mu @ rbar.T
        return mu_f, None if cov is None else rbar @ cov @ rbar.T

    def kv_head_scores(
        self, k: torch.Tensor, v: torch.Tensor, log_mass: torch.Tensor, mu_f: torch.Tensor, cov_f: torch.Tensor | None
    ) -> torch.Tensor:
        """kvpress's score [Hkv, N] (higher = keep) of keys and values [N, Hkv, D] (sinks already left out): per
        query head a softmax over the tokens of the Gaussian expected-attention logits (the linear and covariance
        terms Future Forcing scores with, ``FutureQueryProxy.score_terms``), averaged over each kv group (query
        head j reads kv head j // rep), rescaled by the value norm."""
        n, hkv, _ = k.shape
        sigma_f = mu_f.new_zeros(*mu_f.shape, mu_f.shape[-1]) if cov_f is None else cov_f  # no covariance: term 0
        lin, quad = FutureQueryProxy.score_terms(k, mu_f[None], sigma_f[None])  # [1, H, N]
        z = lin[0] + quad[0] + log_mass.float()[None]  # [H, N]
        p = torch.softmax(z, dim=1).reshape(hkv, -1, n).mean(1)
        if self.use_vnorm:
            p = (p + self.epsilon) * v.float().norm(dim=-1).T
        return p

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        """[N] on the cache's device, higher = keep: kvpress's per-kv-head score averaged over kv heads; the
        first ``n_sink`` tokens of the stream score the maximum + 1.  Before any statistics: recency."""
        if ctx.layer not in self._mu:
            return tokens.positions[:, 0].float()
        pos = tokens.positions.long()
        sink = pos[:, 0] * ctx.tokens_per_frame + pos[:, 1] * ctx.token_grid[1] + pos[:, 2] < self.n_sink
        rest = (~sink).nonzero().flatten()
        out = torch.ones(tokens.num_tokens, device=ctx.view.device)
        if rest.numel() == 0:
            return out
        per_head = self.kv_head_scores(tokens.k[rest], tokens.v[rest], tokens.log_mass[rest], *self.future_moments(ctx))
        out[rest] = per_head.mean(0)
        out[sink] = per_head.max() + 1
        return out

    def state_dict(self):
        """The latest write pass's query mean (``mu.<layer>``, [H, D] float64) and, with ``use_covariance``, its
        covariance (``cov.<layer>``, [H, D, D]) per layer."""
        return {**super().state_dict(), **layer_tensors_state("mu", self._mu), **layer_tensors_state("cov", self._cov)}

    def load_state_dict(self, state):
        state = dict(state)
        mu, cov = take_layer_state("mu", state), take_layer_state("cov", state)
        if set(cov) != (set(mu) if self.use_covariance else set()):
            raise SnapshotError(
                f"expected-attention state needs cov.<layer> exactly for the layers of mu.<layer> "
                f"when use_covariance (and none otherwise), got mu {sorted(mu)}, cov {sorted(cov)}"
            )
        super().load_state_dict(state)
        self._mu, self._cov = mu, cov
