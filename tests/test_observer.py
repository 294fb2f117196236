"""Engine observers: they see every attention call, compression and block, and change nothing."""

import torch
from test_engine import tiny_model

from ff_engine.engine import AttentionTap, Engine, EngineObserver, QueryMeans, SessionConfig
from ff_engine.policies import make_policy


class Counter(EngineObserver):
    def __init__(self):
        self.calls, self.writes, self.kept, self.blocks = 0, 0, [], []

    def on_attention(self, call):
        self.calls += 1
        self.writes += call.write

    def on_compress(self, session, layer, kept):
        self.kept.append(kept)

    def on_block(self, result):
        self.blocks.append(result.block)


def _run(observers):
    m = tiny_model()
    e = Engine(m, num_pages=400, page_size=4, backend="torch")
    for o in observers:
        e.add_observer(o)
    cfg = SessionConfig(prompt=torch.randn(3, 256), num_frames=12, seed=1, policy=make_policy("future-forcing"),
                        budget_frames=4)
    return e.generate(cfg), m


def test_observers_see_every_call_and_change_nothing():
    plain, _ = _run([])
    counter, tap, means = Counter(), AttentionTap(), QueryMeans()
    observed, m = _run([counter, tap, means])
    assert torch.equal(plain, observed)
    g = m.geometry
    blocks = 12 // g.frames_per_block
    assert counter.blocks == list(range(blocks))
    assert counter.writes == (blocks - 1) * g.num_layers  # the last block writes nothing
    assert counter.calls == len(tap.outputs) and counter.calls > counter.writes
    assert all(len(v) == blocks - 1 for v in means.pre.values()) and len(means.pre) == g.num_layers
    assert max(counter.kept) <= 4 * g.tokens_per_frame
