"""Policies as composition: wrappers (Merge, PageCandidates, BudgetSplit) around any scorer, Future Forcing as their
composition (bit-for-bit what it computed before it was one), and the guide's example (docs/policies.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_engine import tiny_model

from ff_engine.cache import PagedKVCache
from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import ConfigError, SnapshotError
from ff_engine.policies import H2O, CachePolicy, CompressContext, FutureForcing, KeyNorm, LayerTokens, SnapKV
from ff_engine.policies.budget_split import BudgetSplit
from ff_engine.policies.future_forcing import FutureForcingScorer
from ff_engine.policies.merge import Merge
from ff_engine.policies.page_candidates import PageCandidates, PageEstimate
from ff_engine.policies.window import Unbounded
from model_adapters.causal_wan.model import Rope3D

FIXTURE = Path(__file__).parent / "fixtures" / "future_forcing_recorded.safetensors"
GUIDE = Path(__file__).parents[1] / "docs" / "policies.md"
GRID, FPB, HKV, H, D, PAGE = (2, 3), 3, 2, 4, 16, 4
TPF = GRID[0] * GRID[1]
MERGING = {"merge_key_tol": 1.3, "merge_value_tol": 1.5}  # near-duplicate tokens merge, the others are evicted
#: configurations recorded with the monolithic FutureForcing of commit 81c3493 (before it was a composition)
RECORDED = [
    {},
    MERGING,
    {"merge": "affine", "merge_key_tol": 3.0, "merge_value_tol": 3.0},
    {"merge": "none", "form": "exact", "samples": 4},
    {"page_candidates": True, "candidate_oversample": 1.0, **MERGING},
    {"page_candidates": True, "page_rank": "bound", "candidate_oversample": 1.5},
    {"budget_split": "importance", **MERGING},
    {"sink_frames": 2, "form": "moment", "aggregation": "max", "window": 2, **MERGING},
    {"fused_scoring": True, "cov_rank": None, "value_norm": False},
]


class Stream:
    """Drives policies as the engine does on a 2-layer paged cache: per block, append + observe every layer, then
    compress every layer under the policy's layer budgets.  Random keys, every third nearly duplicating its
    neighbour (something to merge); the same seed gives the same stream."""

    def __init__(self, seed: int = 0, budget_frames: int = 6):
        self.g, self.rope, self.budget_frames, self.block = torch.Generator().manual_seed(seed), Rope3D(D, 1024), \
            budget_frames, 0
        self.cache = PagedKVCache(2, HKV, D, PAGE, num_pages=200)
        self.cache.add_session("s", 200)

    def step(self, policy: CachePolicy) -> list[int]:
        g, frames = self.g, torch.arange(self.block * FPB, (self.block + 1) * FPB)
        f, hh, ww = torch.meshgrid(frames, torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
        pos = torch.stack([f, hh, ww], -1).reshape(-1, 3).int()
        for layer in range(2):
            k, v = torch.randn(len(pos), HKV, D, generator=g), torch.randn(len(pos), HKV, D, generator=g)
            k[1::3] = k[::3] + 0.05 * torch.randn(k[::3].shape, generator=g)
            v[1::3] = v[::3] + 0.05 * torch.randn(v[::3].shape, generator=g)
            self.cache.append("s", layer, k, v, pos)
            q = torch.randn(len(pos), H, D, generator=g) + torch.linspace(-1, 1, D)
            policy.observe(layer, q, q, pos)
        budgets = policy.layer_budgets((self.budget_frames + policy.sink_frames) * TPF, 2, PAGE)
        for layer in range(2):
            policy.compress(CompressContext(self.cache.session_view("s", layer), budgets[layer], int(frames[-1]), FPB, TPF, GRID,
                                            self.rope))
        self.block += 1
        return budgets


def run_blocks(policy: CachePolicy, blocks: int = 6):
    """``blocks`` blocks of a fresh ``Stream``: (its cache, the per-block layer budgets)."""
    stream = Stream()
    budgets = [stream.step(policy) for _ in range(blocks)]
    return stream.cache, budgets


def record(policy: CachePolicy) -> dict[str, torch.Tensor]:
    """What ``run_blocks`` leaves: per layer the kept tokens' positions, log-masses and keys / values seen through
    a fixed projection, the per-block budgets, and the policy's counters."""
    cache, budgets = run_blocks(policy)
    proj = torch.randn(HKV * D, generator=torch.Generator().manual_seed(1))
    out = {"budgets": torch.tensor(budgets)}
    for layer in range(2):
        got = cache.gather("s", layer)
        out.update({f"{layer}.positions": got["positions"], f"{layer}.log_mass": got["log_mass"],
                    f"{layer}.k": got["k"].flatten(1) @ proj, f"{layer}.v": got["v"].flatten(1) @ proj})
    out["stats"] = torch.tensor([policy.stats[k] for k in ("merged", "evicted", "candidates", "tokens")])
    return out


@pytest.mark.parametrize("i", range(len(RECORDED)), ids=[json.dumps(p) for p in RECORDED])
def test_composed_future_forcing_equals_the_recorded_monolithic_path(i):
    """Same tokens kept (positions, exactly), same merges (log-masses, keys, values) and counters, same budgets."""
    want = {k[len(f"{i}."):]: v for k, v in safetensors.torch.load_file(FIXTURE).items() if k.startswith(f"{i}.")}
    meta = json.loads(safetensors.safe_open(FIXTURE, "pt").metadata()["configs"])
    assert meta[i] == RECORDED[i]
    # recorded when log-mass and no sink were the defaults
    got = record(FutureForcing(**{"merge": "log-mass", "sink_frames": 0, **RECORDED[i]}))
    assert set(got) == set(want)
    for name in ("budgets", "stats", "0.positions", "1.positions"):
        assert torch.equal(got[name], want[name]), name
    for name in set(got) - {"budgets", "stats", "0.positions", "1.positions"}:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-5), name


def test_future_forcing_is_a_composition_of_the_wrappers():
    ff = FutureForcing(page_candidates=True, merge="affine", budget_split="importance", candidate_oversample=3.0)
    assert [type(p) for p in ff.chain()] == [FutureForcing, BudgetSplit, Merge, PageCandidates, FutureForcingScorer]
    _, split, merge, pages, scorer = ff.chain()
    assert (split.split, merge.mode, merge.partners, pages.oversample) == ("importance", "affine", 3.0, 3.0)
    assert ff.scorer is scorer and ff.proxy is scorer.proxy and ff.stats is merge.stats
    assert [type(p) for p in FutureForcing().chain()] == [FutureForcing, BudgetSplit, Merge, FutureForcingScorer]


def test_future_forcing_scores_only_after_its_statistics():
    """The engine's write pass always observes before it compresses, so no recency fallback exists."""
    cache = PagedKVCache(1, HKV, D, PAGE, num_pages=20)
    cache.add_session("s", 20)
    cache.append("s", 0, torch.randn(30, HKV, D), torch.randn(30, HKV, D), torch.zeros(30, 3, dtype=torch.int32))
    with pytest.raises(AssertionError, match="before observe"):
        FutureForcing().compress(CompressContext(cache.session_view("s", 0), 12, 0, 1, 6, GRID))


# ---- a toy scorer under each wrapper -----------------------------------------------------------------------
@dataclass
class FirstCoordinate(CachePolicy):
    """Toy scorer: a token's first key coordinate (kv head 0).  Page estimates: the page centroid's."""

    name = "first-coordinate"
    scores_whole_layer = False

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        return tokens.k[:, 0, 0]

    def page_estimates(self, ctx: CompressContext) -> PageEstimate:
        return PageEstimate(ctx.view.page_summaries()["centroid"][:, 0, 0])


@dataclass
class WholeLayerFirstCoordinate(FirstCoordinate):
    scores_whole_layer = True


def kept_positions(cache):
    return [sorted(map(tuple, cache.gather("s", layer)["positions"].tolist())) for layer in range(2)]


@pytest.mark.parametrize("scorer", [FirstCoordinate, WholeLayerFirstCoordinate])
def test_merge_without_merging_keeps_what_the_scorer_keeps(scorer):
    plain, _ = run_blocks(scorer())
    wrapped = Merge(scorer(), mode="none")
    merged, _ = run_blocks(wrapped)
    assert kept_positions(merged) == kept_positions(plain)
    assert wrapped.stats["merged"] == 0 and wrapped.stats["evicted"] == 4 * 2 * FPB * TPF  # 4 blocks over budget


def test_merge_folds_a_near_duplicate_into_its_partner():
    """The lowest-scoring token nearly duplicates the next-lowest: it is merged (log-mass ~ log 2), the rest
    evicted."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(12, HKV, D, generator=g), torch.randn(12, HKV, D, generator=g)
    k[:, 0, 0] = torch.arange(12.0)  # scores 0..11
    k[0], v[0] = k[1] - 1e-3, v[1]  # token 0 (lowest) ~ token 1 (next lowest)
    cache = PagedKVCache(1, HKV, D, PAGE, num_pages=8)
    cache.add_session("s", 8)
    cache.append("s", 0, k, v, torch.stack([torch.arange(12), torch.zeros(12), torch.zeros(12)], 1).int())
    policy = Merge(FirstCoordinate(), key_tol=0.3, value_tol=0.3, partners=3.0)  # spread over >= 2 partners
    policy.compress(CompressContext(cache.session_view("s", 0), 11, 11, 1, 1, (1, 1)))
    got = cache.gather("s", 0)
    assert sorted(got["positions"][:, 0].tolist()) == list(range(1, 12))
    assert abs(float(got["log_mass"][got["positions"][:, 0] == 1]) - 0.6931) < 1e-3
    assert policy.stats["merged"] == 1 and policy.stats["evicted"] == 0


def test_page_candidates_score_only_the_lowest_pages_and_are_exact_when_they_cover_everything():
    calls = []

    @dataclass
    class Spy(FirstCoordinate):
        def score(self, tokens, ctx):
            calls.append(tokens.index.clone())
            return super().score(tokens, ctx)

    pages = PageCandidates(Spy(), oversample=1.0)
    run_blocks(pages, blocks=3)
    removed = FPB * TPF  # a block per compression
    assert calls and all(removed <= c.numel() < 2 * removed for c in calls)  # whole pages, never all 36 removable
    exact, _ = run_blocks(FirstCoordinate(), blocks=3)
    wide, _ = run_blocks(PageCandidates(FirstCoordinate(), oversample=100.0), blocks=3)
    assert kept_positions(wide) == kept_positions(exact)


def test_budget_split_shares_pages_by_spread():
    policy = BudgetSplit(FirstCoordinate())
    assert policy.layer_budgets(36, 2, PAGE) == [36, 36]  # no spread yet: uniform
    run_blocks(policy, blocks=3)
    budgets = policy.layer_budgets(36, 2, PAGE)
    assert sum(budgets) <= 72 and all(b % PAGE == 0 and b >= FPB * TPF for b in budgets) and budgets != [36, 36]
    assert BudgetSplit(FirstCoordinate(), split="uniform").layer_budgets(36, 2, PAGE) == [36, 36]


@pytest.mark.parametrize("make", [
    lambda: BudgetSplit(Merge(SnapKV(num_queries=16, kernel=3), key_tol=5.0, value_tol=5.0)),
    lambda: BudgetSplit(Merge(KeyNorm(), key_tol=5.0, value_tol=5.0)),
    lambda: Merge(BudgetSplit(H2O(num_queries=16)), key_tol=5.0, value_tol=5.0),
], ids=["snapkv", "key-norm", "h2o"])
def test_merge_and_budget_split_around_baselines_in_the_engine(make):
    m = tiny_model()
    policy = make()
    e = Engine(m, num_pages=400, page_size=4, backend="torch")
    s = e.add_session(SessionConfig(prompt=torch.randn(3, 256), num_frames=15, policy=policy, budget_frames=6))
    tpf, layers, splits = m.geometry.tokens_per_frame, m.geometry.num_layers, set()
    while s.id in e.sessions:
        e.step([s.id])
        e.cache.check_invariants()
        if s.id in e.sessions:
            held = [e.cache.num_tokens(s.id, layer) for layer in range(layers)]
            assert sum(held) <= layers * 6 * tpf
            splits.add(tuple(s.policy.layer_budgets(6 * tpf, layers, 4)))
    merge = next(p for p in s.policy.chain() if isinstance(p, Merge))
    assert merge.stats["merged"] > 0 and len(splits) > 1  # it merged, and the split moved off uniform


def test_wrapped_state_round_trip_continues_identically():
    """A chain rebuilt from the same configuration and loaded with ``state_dict()`` (numbers through JSON, as
    snapshots store them) continues like the original: H2O's per-token accumulator is re-aligned through the
    wrappers' ``on_compact``, the split and the counters carry over."""
    def make():
        return BudgetSplit(Merge(H2O(num_queries=8), key_tol=1.3, value_tol=1.5))

    original, twin, restored = make(), make(), make()
    a, b = Stream(), Stream()
    for _ in range(4):
        a.step(original)
        b.step(twin)  # the same cache contents; the twin is then replaced by ``restored``
    state = original.state_dict()
    assert {"stats.merged", "min_tokens", "layer_spread.0", "acc.0", "q.0"} <= set(state)
    numbers = json.loads(json.dumps({k: v for k, v in state.items() if not torch.is_tensor(v)}))
    restored.load_state_dict(numbers | {k: v.clone() for k, v in state.items() if torch.is_tensor(v)})
    for _ in range(3):
        assert a.step(original) == b.step(restored)
    assert kept_positions(a.cache) == kept_positions(b.cache) and original.state_dict().keys() == state.keys()
    assert torch.equal(a.cache.gather("s", 1)["log_mass"], b.cache.gather("s", 1)["log_mass"])
    assert original.inner.stats == restored.inner.stats and original.inner.stats["merged"] > 0
    with pytest.raises(SnapshotError, match="stats"):
        make().load_state_dict({**state, "stats.merged": 1.5})
    with pytest.raises(SnapshotError, match="min_tokens"):
        make().load_state_dict({k: v for k, v in state.items() if k != "min_tokens"})


def test_wrappers_refuse_what_they_cannot_do():
    with pytest.raises(ConfigError, match="appears twice"):
        Merge(BudgetSplit(Merge(KeyNorm())))
    with pytest.raises(ConfigError, match="affine"):
        Merge(KeyNorm(), mode="affine")
    with pytest.raises(ConfigError, match="page estimates"):
        PageCandidates(KeyNorm())
    with pytest.raises(ConfigError, match="wraps the scorer itself"):
        PageCandidates(Merge(FirstCoordinate()))
    with pytest.raises(ConfigError, match="bounded"):
        Merge(Unbounded())
    with pytest.raises(ConfigError, match="policy parameter key_tol must be"):
        Merge(KeyNorm(), key_tol=-1.0)


def test_the_guide_example_serves_a_stream():
    """docs/policies.md's ``my_policies.py`` blocks, run as written: the KeyDiff scorer alone, wrapped, and as a
    registered-style configuration."""
    blocks = re.findall(r"```python\n(# my_policies\.py.*?)```", GUIDE.read_text(), re.DOTALL)
    assert len(blocks) == 3
    ns: dict = {}
    exec(compile("\n".join(blocks), str(GUIDE), "exec"), ns)  # noqa: S102 - our own documentation, run as written
    m = tiny_model()
    for policy in (ns["KeyDiff"](), ns["merging_key_diff"], ns["MergingKeyDiff"](merge_key_tol=2.0)):
        e = Engine(m, num_pages=300, page_size=4, backend="torch")
        lat = e.generate(SessionConfig(prompt=torch.randn(3, 256), num_frames=12, policy=policy, budget_frames=3))
        assert lat.shape[0] == 12 and torch.isfinite(lat).all()
    with pytest.raises(ConfigError, match="merge_key_tol"):
        ns["MergingKeyDiff"](merge_key_tol=-1.0)


def test_wrappers_keep_device_placement():
    """Around a whole-layer scorer (SnapKV, key norm) on the fake accelerator: masks, merge buffers and the split
    stay on the cache's device (every removed token merges: wide tolerances)."""
    from test_device_check import FakeAccelerator, OnFake

    m = tiny_model()
    for p in m.parameters():
        p._on_fake = True
    prompt = torch.randn(5, m.cfg.text_dim)
    for policy in (BudgetSplit(Merge(SnapKV(kernel=3), key_tol=1e3, value_tol=1e3)),
                   Merge(BudgetSplit(KeyNorm()), key_tol=1e3, value_tol=1e3)):
        with FakeAccelerator():
            e = Engine(OnFake(m), num_pages=200, page_size=4, backend="torch", device="meta")
            s = e.add_session(SessionConfig(prompt=prompt, num_frames=12, policy=policy, seed=1, budget_frames=6))
            while s.id in e.sessions:
                e.step([s.id])
        merge = next(p for p in s.policy.chain() if isinstance(p, Merge))  # the session's own copy
        assert len(s.latents) == 4 and merge.stats["merged"] > 0
