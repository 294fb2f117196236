"""Session snapshot / restore: a restored session continues bit-identically (fp32) to one never interrupted."""

import dataclasses
import json
import random

import pytest
import safetensors.torch
import torch
from test_engine import noises, tiny_model

from ff_engine.checksum import KEY, tensors_digest
from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.snapshot import ADMISSION_ONLY_FIELDS, CONFIG_FIELDS, SessionSnapshot
from ff_engine.errors import BudgetError, ConfigError, SnapshotError
from ff_engine.policies import POLICIES, FutureForcing, make_policy

FRAMES = 18  # 6 blocks of 3 frames, 6 tokens per frame
SUMMARY_KEYS = ("valid", "log_mass", "centroid", "radius")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompt():
    return torch.randn(5, 256, generator=torch.Generator().manual_seed(11))


def budget(policy):
    return None if not policy.bounded else max(6, 3 + policy.sink_frames)


def merging_ff(**kw):
    """Future Forcing with tolerances wide enough that the tiny model's tokens do merge (no sink: at budget 6 a
    3-frame sink leaves the merge too little room to act before the snapshot)."""
    return FutureForcing(merge="log-mass", merge_key_tol=2.0, merge_value_tol=2.0, sink_frames=0, **kw)


def generate(engine, cfg, snap_at=None, on_snapshot=None):
    """Run a stream to the end through ``engine.step``; snapshot it before block ``snap_at``."""
    s = engine.add_session(cfg)
    snap = None
    while s.id in engine.sessions:
        if s.block == snap_at:
            snap = engine.snapshot(s.id)
            if on_snapshot:
                on_snapshot(engine, s)
        (r,) = engine.step([s.id])
        assert r.error is None
    return torch.cat(s.latents), snap


def resume(engine, snap, on_restore=None):
    s = engine.restore(SessionSnapshot.from_bytes(snap.to_bytes()))
    if on_restore:
        on_restore(engine, s)
    while s.id in engine.sessions:
        (r,) = engine.step([s.id])
        assert r.error is None
    assert engine.cache.pool.num_free == engine.cache.num_pages
    return torch.cat(s.latents)


def snap_block(name):
    return random.Random(f"snapshot-{name}").randrange(1, FRAMES // 3 - 1)  # seeded, leaves >= 1 block to run


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_restored_session_is_bit_identical_for_every_policy(model, name):
    policy = make_policy(name)
    cfg = SessionConfig(prompt=prompt(), num_frames=FRAMES, seed=5, policy=policy, budget_frames=budget(policy))
    full, snap = generate(Engine(model, num_pages=200, page_size=4, backend="torch"), cfg, snap_block(name))
    assert snap.meta["session"]["block"] == snap_block(name) and snap.meta["policy"]["name"] == name
    assert torch.equal(resume(Engine(model, num_pages=200, page_size=4, backend="torch"), snap), full)


def test_future_forcing_with_merged_tokens_and_page_summaries(model):
    """Merges happened before the snapshot (log-mass != 0); page candidates read the page summaries the restore
    recomputes, which must equal the source's; the prompt state re-encoded on restore is bit-identical."""
    seen = {}

    def at_snapshot(engine, s):
        layers = range(model.geometry.num_layers)
        seen["log_mass"] = max(float(engine.cache.gather(s.id, layer)["log_mass"].abs().max()) for layer in layers)
        seen["summaries"] = [engine.cache.page_summaries(s.id, layer) for layer in layers]
        seen["prompt"] = s.prompt_state

    def at_restore(engine, s):
        for layer, want in enumerate(seen["summaries"]):
            got = engine.cache.page_summaries(s.id, layer)
            assert all(torch.equal(got[k], want[k]) for k in SUMMARY_KEYS)
        assert all(
            torch.equal(a, b) for a, b in zip(s.prompt_state.k + s.prompt_state.v, seen["prompt"].k + seen["prompt"].v)
        )

    cfg = SessionConfig(
        prompt=prompt(),
        num_frames=FRAMES,
        seed=3,
        budget_frames=6,
        policy=merging_ff(page_candidates=True, page_rank="bound"),
    )
    full, snap = generate(Engine(model, num_pages=200, page_size=4, backend="torch"), cfg, 3, at_snapshot)
    assert seen["log_mass"] > 0  # merged tokens are in the snapshot
    assert snap.meta["policy"]["state"]["stats.merged"] > 0
    assert torch.equal(resume(Engine(model, num_pages=200, page_size=4, backend="torch"), snap, at_restore), full)
    # taking a snapshot leaves the session untouched: the same stream without one gives the same latents
    plain, _ = generate(Engine(model, num_pages=200, page_size=4, backend="torch"), dataclasses.replace(cfg))
    assert torch.equal(plain, full)


def test_window_proxy_and_given_noise_cursor(model):
    """Future Forcing's windowed statistics (a deque per layer) and a step-noise list half consumed."""
    init, steps = noises(model, FRAMES, seed=2)
    cfg = SessionConfig(
        prompt=prompt(),
        num_frames=FRAMES,
        budget_frames=6,
        policy=merging_ff(window=2),
        initial_noise=init,
        step_noise=steps,
    )
    full, snap = generate(Engine(model, num_pages=200, page_size=8, backend="torch"), cfg, 4)
    assert snap.meta["session"]["step_noise_pos"] == 4 * 3
    assert torch.equal(resume(Engine(model, num_pages=200, page_size=8, backend="torch"), snap), full)


def test_restore_with_another_page_size_is_bit_identical(model):
    """Pages are re-laid (4 -> 16 slots) but each layer's token order is kept, and the torch backend reduces over
    the gathered sequence, so the continuation is bit-identical for policies that do not read the page layout
    (this one merges; page candidates or ``budget_split="importance"`` would choose differently)."""
    cfg = SessionConfig(prompt=prompt(), num_frames=FRAMES, seed=1, budget_frames=6, policy=merging_ff())
    full, snap = generate(Engine(model, num_pages=200, page_size=4, backend="torch"), cfg, 3)
    assert torch.equal(resume(Engine(model, num_pages=60, page_size=16, backend="torch"), snap), full)


@pytest.mark.parametrize("page_size", [16, 32])
def test_restore_on_vllm_cpu_is_bit_identical(model, page_size):
    """vLLM's CPU op, source with 16-slot pages, restored with 16 and 32: bit-identical (the packed mirror is
    re-packed by the appends of the restore)."""
    cfg = SessionConfig(prompt=prompt(), num_frames=FRAMES, seed=4, budget_frames=6, policy=make_policy("h2o"))
    full, snap = generate(Engine(model, num_pages=60, page_size=16, backend="vllm-cpu"), cfg, 2)
    assert torch.equal(resume(Engine(model, num_pages=60, page_size=page_size, backend="vllm-cpu"), snap), full)


def test_file_round_trip_is_atomic(model, tmp_path):
    cfg = SessionConfig(prompt=prompt(), num_frames=FRAMES, budget_frames=6, policy=make_policy("h2o"))
    _, snap = generate(Engine(model, num_pages=200, page_size=4, backend="torch"), cfg, 2)
    path = tmp_path / "s.safetensors"
    snap.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind
    back = SessionSnapshot.load(path)
    assert back.meta == snap.meta and back.tensors.keys() == snap.tensors.keys()
    assert all(torch.equal(back.tensors[k], t) for k, t in snap.tensors.items())
    assert snap.nbytes <= path.stat().st_size <= snap.nbytes + 4096
    with pytest.raises(SnapshotError, match="cannot read"):
        SessionSnapshot.load(tmp_path / "missing.safetensors")


def test_retained_window_round_trips_and_continues_bit_identically(model):
    """A session keeping only its last 6 frames snapshots that window and its first frame (format 2); the restored
    session keeps the window, and its remaining blocks equal those of a session that kept everything."""
    cfg = SessionConfig(prompt=prompt(), num_frames=FRAMES, budget_frames=6, policy=make_policy("sink-window"))
    full, _ = generate(Engine(model, num_pages=200, page_size=4, backend="torch"), cfg)
    kept, snap = generate(Engine(model, num_pages=200, page_size=4, backend="torch"),
                          dataclasses.replace(cfg, retain_frames=6), snap_at=4)
    assert snap.meta["version"] == 3 and snap.meta["session"]["retain_frames"] == 6
    assert snap.meta["session"]["latents_start_frame"] == 6 and snap.tensors["latents"].shape[0] == 6
    assert torch.equal(snap.tensors["latents"], full[6:12])
    e = Engine(model, num_pages=200, page_size=4, backend="torch")
    restored = []
    tail = resume(e, snap, on_restore=lambda engine, s: restored.append((s.latents_start_frame, s.cfg.retain_frames)))
    assert restored == [(6, 6)] and torch.equal(tail, full[-6:]) and torch.equal(kept, full[-6:])
    session = {**snap.meta["session"], "latents_start_frame": 3}
    shifted = SessionSnapshot({**snap.meta, "session": session}, snap.tensors)
    with pytest.raises(SnapshotError, match="latents"):  # the window must end at the snapshot's block
        e.restore(shifted)
    assert not e.sessions and e.cache.pool.num_free == e.cache.num_pages


def test_a_version_1_snapshot_still_loads(model, good):
    """Format 1 had neither retain_frames nor latents_start_frame: every frame from 0 is kept."""
    session = {k: v for k, v in good.meta["session"].items() if k not in ("retain_frames", "latents_start_frame")}
    old = SessionSnapshot.from_bytes(_with(good, meta={"version": 1, "session": session}))
    expect = resume(Engine(model, num_pages=200, page_size=4, backend="torch"), good)
    assert torch.equal(resume(Engine(model, num_pages=200, page_size=4, backend="torch"), old), expect)


def test_config_fields_are_all_carried():
    """Every request field is either carried or (the prefix) consumed at admission; nothing falls in between."""
    assert {f.name for f in dataclasses.fields(SessionConfig)} == set(CONFIG_FIELDS) | set(ADMISSION_ONLY_FIELDS)
    assert not set(CONFIG_FIELDS) & set(ADMISSION_ONLY_FIELDS)


@pytest.fixture(scope="module")
def good(model):
    cfg = SessionConfig(prompt=prompt(), num_frames=FRAMES, budget_frames=6, policy=make_policy("future-forcing"))
    return generate(Engine(model, num_pages=200, page_size=4, backend="torch"), cfg, 2)[1]


def _with(snap, meta=None, drop=(), **tensors):
    m = {**snap.meta, **(meta or {})}
    t = {**{k: v for k, v in snap.tensors.items() if k not in drop}, **tensors}
    meta = json.dumps(m)  # with a valid checksum: these tests reach the structural checks behind it
    return safetensors.torch.save(t, metadata={"ff_engine.snapshot": meta, KEY: tensors_digest(t, meta)})


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda s: b"",
        lambda s: b"not a snapshot at all",
        lambda s: s.to_bytes()[:-100],  # truncated
        lambda s: safetensors.torch.save(s.tensors),  # no meta
        lambda s: _with(s, meta={"version": 99}),
        lambda s: _with(s, meta={"format": "other"}),
        lambda s: _with(s, meta={"session": {**s.meta["session"], "block": "2"}}),
        lambda s: _with(s, drop=("cache.1.v",)),
        lambda s: _with(s, **{"cache.0.positions": torch.zeros(3, 3, dtype=torch.int32)}),
        lambda s: _with(s, **{"rng.generator": torch.zeros(3)}),
        lambda s: _with(s, extra=torch.zeros(1)),
        lambda s: _with(s, meta={"session": {**s.meta["session"], "retain_frames": -1}}),
    ],
)
def test_malformed_bytes_are_refused(good, make_bad):
    with pytest.raises(SnapshotError):
        SessionSnapshot.from_bytes(make_bad(good))


def test_wrong_model_sampler_or_state_is_refused_and_leaks_nothing(model, good):
    for other in (tiny_model(num_layers=3), tiny_model(ffn_dim=256)):
        with pytest.raises(SnapshotError, match="another model"):
            Engine(other, num_pages=200, page_size=4, backend="torch").restore(good)
    e = Engine(model, num_pages=200, page_size=4, backend="torch", context_noise=10.0)
    with pytest.raises(SnapshotError, match="another sampler"):
        e.restore(good)
    e = Engine(model, num_pages=200, page_size=4, backend="torch")
    state = {**good.meta["policy"]["state"], "bogus": 1}
    bad_state = SessionSnapshot({**good.meta, "policy": {**good.meta["policy"], "state": state}}, good.tensors)
    with pytest.raises(SnapshotError, match="bogus"):
        e.restore(bad_state)
    bad_policy = SessionSnapshot({**good.meta, "policy": {**good.meta["policy"], "name": "lru"}}, good.tensors)
    with pytest.raises(SnapshotError, match="policy"):
        e.restore(bad_policy)
    with pytest.raises(BudgetError):
        Engine(model, num_pages=8, page_size=4, backend="torch").restore(good)
    with pytest.raises(SnapshotError, match="not active"):
        e.snapshot("nope")
    s = e.restore(good, session_id="copy-1")
    with pytest.raises(ConfigError, match="already active"):
        e.restore(good, session_id="copy-1")
    e.cancel(s.id)
    assert not e.sessions and e.cache.pool.reserved_total == 0 and e.cache.pool.num_free == e.cache.num_pages


def test_a_prefixed_stream_resumes_bit_identically(model):
    """The prefix is consumed at admission (its K/V and frames are in the snapshot), so the restored stream
    continues after it, never writes it twice, and ends as the uninterrupted stream does."""
    g = model.geometry
    lat = torch.randn(6, g.latent_channels, *g.latent_hw, generator=torch.Generator().manual_seed(3))
    cfg = SessionConfig(prompt=prompt(), num_frames=FRAMES, budget_frames=9, policy=make_policy("future-forcing"),
                        prefix=lat, session_id="prefixed")

    def run(snap_at):
        engine = Engine(model, num_pages=200, page_size=4, backend="torch")
        s = engine.add_session(cfg)
        engine.prefill(s.id, lat)
        snap = None
        while s.id in engine.sessions:
            if s.block == snap_at:
                snap = engine.snapshot(s.id)
            assert engine.step([s.id])[0].error is None
        return torch.cat(s.latents), snap

    full, snap = run(snap_at=3)
    assert torch.equal(full[:6], lat.to(full.dtype))
    assert "config.prefix" not in snap.tensors and "prefix" not in snap.meta["session"]
    assert torch.equal(resume(Engine(model, num_pages=200, page_size=4, backend="torch"), snap), full)
