"""Observer hooks of the engine: how probes, recorders and benchmarks see a run without working around it.

A probe used to replace ``engine.backend`` with a wrapper (the attention tap) or pose as a cache policy (the
query recorder subclassed ``Window``): each one a different trick, each one breaking when the engine changes.
Instead an ``EngineObserver`` registered with ``Engine.add_observer`` is called at three points of the one step
loop; observers only read (they must not change the tensors they are handed), so a run with observers produces
exactly what it would without them.

  * ``on_attention(call)``: after every attention call of a model forward (``AttentionCall``: layer, sessions,
    the batch, its output, whether it is the cache-writing pass, the pre-RoPE queries and token positions);
  * ``on_compress(session, layer, kept)``: after the policy compressed one layer of a session (tokens kept);
  * ``on_block(result)``: for every ``BlockResult`` that ``Engine.step`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ff_engine.attention import AttentionBatch


@dataclass(frozen=True)
class AttentionCall:
    """One attention call of one layer for a batch of sessions (rows of session i: ``batch.seq(i)``)."""

    layer: int
    session_ids: tuple[str, ...]
    batch: AttentionBatch
    out: torch.Tensor  # [N, H, D]
    write: bool  # the cache-writing pass (its K/V are appended after the call), not a denoising step
    q_pre_rope: torch.Tensor  # [N, H, D]
    positions: torch.Tensor  # [N, 3] int32 (latent frame, h, w)


class EngineObserver:
    """Base class: every hook does nothing; override the ones you need."""

    def on_attention(self, call: AttentionCall) -> None:
        pass

    def on_compress(self, session, layer: int, kept: int) -> None:
        pass

    def on_block(self, result) -> None:
        pass


class AttentionTap(EngineObserver):
    """Keeps each attention call's output (for the attention-output error of a policy against the unbounded
    cache on the same inputs), while ``active``."""

    def __init__(self, engine=None):
        self.outputs: list[torch.Tensor] = []
        self.active = True
        if engine is not None:
            engine.add_observer(self)

    def on_attention(self, call: AttentionCall) -> None:
        if self.active:
            self.outputs.append(call.out.detach().clone())


class QueryMeans(EngineObserver):
    """Per layer, the per-head mean of the pre- and post-RoPE queries of every cache-writing pass (all blocks of a
    stream but the last, which writes nothing), one entry per session and pass, in call order."""

    def __init__(self):
        self.pre: dict[int, list[torch.Tensor]] = {}
        self.post: dict[int, list[torch.Tensor]] = {}

    def on_attention(self, call: AttentionCall) -> None:
        if not call.write:
            return
        for i in range(len(call.session_ids)):
            rows = call.batch.seq(i)
            self.pre.setdefault(call.layer, []).append(call.q_pre_rope[rows].float().mean(0))  # [H, D]
            self.post.setdefault(call.layer, []).append(call.batch.q[rows].float().mean(0))
