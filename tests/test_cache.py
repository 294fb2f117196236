import importlib
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ff_engine.cache import PagedKVCache
from ff_engine.errors import BudgetError, ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pkg", ["kernels", "model_adapters", "ff_engine"])
def test_generic_packages_come_from_this_repo(pkg):
    mod = importlib.import_module(pkg)
    assert pathlib.Path(mod.__file__).resolve().is_relative_to(REPO), mod.__file__


def _kv(n, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g), torch.zeros(n, 3, dtype=torch.int32)


def test_append_gather_roundtrip_and_page_count():
    c = PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, page_size=5, num_pages=20)
    c.add_session("a", 10)
    k, v, p = _kv(12)
    p[:, 0] = torch.arange(12)
    c.append("a", 0, k[:7], v[:7], p[:7])
    c.append("a", 0, k[7:], v[7:], p[7:])
    g = c.gather("a", 0)
    assert torch.equal(g["k"], k) and torch.equal(g["v"], v) and torch.equal(g["positions"], p)
    assert len(c.table("a", 0).pages) == 3 and c.pages_held("a") == 3
    assert c.num_tokens("a", 1) == 0
    c.check_invariants()


def test_compact_preserves_survivors_and_frees_pages():
    c = PagedKVCache(1, 2, 8, page_size=4, num_pages=8)
    c.add_session("a", 8)
    k, v, p = _kv(14)
    p[:, 0] = torch.arange(14)
    c.append("a", 0, k, v, p, log_mass=torch.arange(14).float())
    keep = torch.tensor([0, 1, 5, 9, 13])
    order = c.compact("a", 0, keep)
    g = c.gather("a", 0)
    assert c.pages_held("a") == 2 and sorted(order.tolist()) == keep.tolist()
    assert order[:2].tolist() == [0, 1]  # survivors below len(keep) never move
    assert torch.equal(g["k"], k[order]) and torch.equal(g["v"], v[order])
    assert torch.equal(g["positions"], p[order]) and torch.equal(g["log_mass"], order.float())
    c.check_invariants()


class _InterruptOnFree:
    """A storage listener that raises like Ctrl-C the first time pages are freed: the moment a compaction has
    already shortened its page table but not yet told the pool."""

    def __init__(self):
        self.armed = True

    def on_write(self, cache, slots):
        pass

    def on_free(self, cache, pages):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def check_invariants(self, cache):
        pass


def test_release_after_an_interrupted_compaction_scrubs_and_frees_every_page():
    c = PagedKVCache(2, 2, 8, page_size=4, num_pages=12)
    c.add_session("a", 8)
    c.add_session("b", 4)
    for sid in ("a", "b"):
        for layer in (0, 1):
            c.append(sid, layer, *_kv(14 if sid == "a" else 6, seed=layer))
    b_before = c.gather("b", 1)
    c.listeners.append(_InterruptOnFree())
    with pytest.raises(KeyboardInterrupt):
        c.compact("a", 0, torch.tensor([0, 3]))
    in_tables = sum(len(c.table("a", layer).pages) for layer in (0, 1))
    assert len(c.pool.held_pages("a")) > in_tables  # the tables fell behind the pool: the state to clean up
    c.release_session("a")  # the cleanup path must neither crash nor leak
    c.check_invariants()
    assert c.pool.num_free == c.num_pages - c.pages_held("b")
    b_pages = {p for layer in (0, 1) for p in c.table("b", layer).pages}
    others = torch.tensor([p for p in range(c.num_pages + 1) if p not in b_pages])
    assert not c.key_cache[others].any() and not c.value_cache[others].any()  # a's pages scrubbed, even the lost
    after = c.gather("b", 1)
    assert torch.equal(after["k"], b_before["k"]) and torch.equal(after["v"], b_before["v"])  # b untouched


def test_bad_inputs_name_the_parameter_and_write_nothing():
    with pytest.raises(ConfigError, match="page_size"):
        PagedKVCache(1, 2, 8, page_size=0, num_pages=4)
    with pytest.raises(BudgetError, match="num_pages"):
        PagedKVCache(1, 2, 8, page_size=4, num_pages=0)
    c = PagedKVCache(1, 2, 8, page_size=4, num_pages=8)
    c.add_session("a", 2)
    k, v, p = _kv(9)
    with pytest.raises(BudgetError, match="reservation"):
        c.append("a", 0, k, v, p)  # 3 pages > 2 reserved
    assert c.num_tokens("a", 0) == 0 and c.pages_held("a") == 0
    with pytest.raises(ConfigError, match="dtype"):
        c.append("a", 0, k.double(), v.double(), p)
    with pytest.raises(ConfigError, match="shape"):
        c.append("a", 0, k[:, :1], v[:, :1], p)
    with pytest.raises(BudgetError, match="unreserved"):
        c.add_session("b", 7)
    c.check_invariants()


# ---- property test: random reserve / append / compact / release / cancel ------------------------------
ops = st.lists(
    st.tuples(st.sampled_from(["reserve", "append", "compact", "release"]), st.integers(0, 3),
              st.integers(0, 2), st.integers(1, 40), st.integers(0, 2**16)),
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, page_size=st.sampled_from([1, 3, 4, 16]))
def test_page_accounting_property(ops, page_size):
    c = PagedKVCache(num_layers=3, num_kv_heads=1, head_dim=4, page_size=page_size, num_pages=40)
    shadow: dict[tuple[str, int], torch.Tensor] = {}
    for op, s, layer, n, seed in ops:
        sid = f"s{s}"
        if op == "reserve":
            if c.has_session(sid):
                continue
            want = max(1, n // 2)
            if c.pool.can_reserve(want):
                c.add_session(sid, want)
            else:
                with pytest.raises(BudgetError):
                    c.add_session(sid, want)
        elif not c.has_session(sid):
            continue
        elif op == "append":
            k = torch.randn(n, 1, 4, generator=torch.Generator().manual_seed(seed))
            before = c.pages_held(sid)
            try:
                c.append(sid, layer, k, k.clone(), torch.zeros(n, 3, dtype=torch.int32))
                shadow[(sid, layer)] = torch.cat([shadow.get((sid, layer), torch.zeros(0, 1, 4)), k])
            except BudgetError:
                assert c.pages_held(sid) == before  # nothing half-written
        elif op == "compact":
            cur = shadow.get((sid, layer), torch.zeros(0, 1, 4))
            mask = torch.rand(cur.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
            keep = mask.nonzero().flatten()
            order = c.compact(sid, layer, keep)
            shadow[(sid, layer)] = cur[order]
        elif op == "release":
            c.release_session(sid)
            for key in [k for k in shadow if k[0] == sid]:
                del shadow[key]
        c.check_invariants()
        for sid2 in c.pool.sessions():
            assert c.pages_held(sid2) <= c.pool.reserved(sid2)
        for (sid2, l2), ref in shadow.items():
            assert torch.equal(c.gather(sid2, l2)["k"], ref)
    for sid in list(c.pool.sessions()):
        c.release_session(sid)
    assert c.pool.num_free == c.num_pages
