"""The device check's ``features`` stage: what the engine grew since the first check was written, on the card.

Each check records figures, never asserts (a GPU figure is what it is; the JSON says what differed):

* ``fork``: the embedded world model v4 (action-conditioned causal Wan) on the device; a stream forks after a
  third of its blocks (pages shared copy-on-write through the block pool's reference counts), the fork steers ``left``; the
  source's blocks after the fork against a solo run of the same stream (bit-identical on CPU; on a GPU batched
  shapes may round differently, so the largest difference is recorded), the pages shared at the fork, and the
  pages left in the pool after both finish (must be the pool's size);
* ``rollback``: the same model with an undo history; the last half of the blocks stepped rolled back and
  regenerated under the same actions against the first time (largest difference);
* ``isolation``: the ``flex`` backend's compiled path on the device with a NaN neighbour batched beside a victim
  (``tests/test_isolation.py``'s scenario): the victim's rows must be finite and equal its solo call;
* ``limits`` (in the throughput stage, ``limit_fractions``): each full-size experiment's steady block time as a
  multiple of the arithmetic lower bound of ``ff_engine.limits`` for this card (H100 or H200 by name).
"""

from __future__ import annotations

import math
import time


def _world_engine(device, model=None, **engine_kw):
    import torch

    from ff_engine.engine import Engine

    from .device_check import OnDevice

    model = model or world_model()
    dtype = torch.float32  # the world model is small; float32 keeps its figures comparable with the CPU's
    return Engine(OnDevice(model.to(device, dtype), device), num_pages=256, page_size=16, backend="flex",
                  device=str(device), **engine_kw)


def world_model():
    """The embedded world model v4; on a machine without ``safetensors`` (a bare GPU box) the same architecture
    (the ``world-v4`` preset) with seeded random weights -- fork, rollback and isolation are mechanics, and
    ``weights`` in the JSON says which ran."""
    from ff_engine.models import build_model, load_model
    from model_adapters import registry
    from model_adapters.world import EMBEDDED_V4

    try:
        model = load_model(str(EMBEDDED_V4))
        model.weights = EMBEDDED_V4.name
    except ImportError:
        model = build_model(registry.get_preset("world-v4"), seed=0)
        model.weights = "random (world-v4 preset; safetensors not importable)"
    return model.eval()


def _session(engine, sid: str, actions: list[int], frames: int):
    import torch

    from ff_engine.engine import SessionConfig
    from ff_engine.policies import make_policy

    prompt = torch.zeros(1, engine.model.cfg.text_dim)
    return SessionConfig(prompt=prompt, num_frames=frames, seed=3, policy=make_policy("window"), budget_frames=6,
                         session_id=sid, actions=actions)


def _run(engine, ids) -> dict:
    out = {i: [] for i in ids}
    while any(i in engine.sessions for i in ids):
        for r in engine.step([i for i in ids if i in engine.sessions]):
            out[r.session_id].append(r.latents)
    return out


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) if a else math.nan


def check_fork(device, frames: int) -> dict:
    import torch

    right = [2] * frames
    solo = _world_engine(device)
    solo.add_session(_session(solo, "a", right, frames))
    ref = _run(solo, ["a"])["a"]
    e = _world_engine(device)
    e.add_session(_session(e, "a", right, frames))
    blocks = frames // e.geometry.frames_per_block
    first = [e.step(["a"])[0].latents for _ in range(max(1, blocks // 3))]
    t0 = time.perf_counter()
    e.fork("a", "b")
    fork_s = time.perf_counter() - t0
    shared = e.cache.shared_pages("b")
    e.set_actions("b", [1] * frames)
    rest = _run(e, ["a", "b"])
    return {"source_vs_solo_max_abs_diff": _max_diff(first + rest["a"], ref),
            "fork_differs_from_source": _max_diff(rest["b"], rest["a"]), "fork_seconds": fork_s,
            "shared_pages_at_fork": shared, "free_pages_after": e.cache.pool.num_free,
            "pool_pages": e.cache.pool.capacity, "weights": e.model.model.weights,
            "finite": all(bool(torch.isfinite(x).all()) for x in rest["a"] + rest["b"])}


def check_rollback(device, frames: int) -> dict:
    model = world_model()
    n = frames // model.geometry.frames_per_block  # blocks stepped; the last n // 2 are undone and regenerated
    e = _world_engine(device, model, undo_blocks=n // 2)
    e.add_session(_session(e, "a", [2] * (2 * frames), 2 * frames))  # longer than the blocks stepped: still live
    blocks = [e.step(["a"])[0].latents for _ in range(n)]
    e.rollback("a", blocks=n // 2)
    again = [e.step(["a"])[0].latents for _ in range(n // 2)]
    return {"regenerated_vs_first_max_abs_diff": _max_diff(again, blocks[n - n // 2:])}


def check_isolation(device, frames: int) -> dict:
    import torch

    from ff_engine.attention import AttentionBatch, get_backend
    from ff_engine.cache import PagedKVCache

    h, d, ps = 2, 64, 16
    be = get_backend("flex")

    def kv(n, seed, fill=None):
        g = torch.Generator().manual_seed(seed)
        k, v = torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g)
        if fill is not None:
            k.fill_(fill), v.fill_(fill)
        return k.to(device), v.to(device)

    def cache_with(sids):
        c = PagedKVCache(1, h, d, ps, num_pages=16, device=str(device))
        for sid, n, seed, fill in sids:
            c.add_session(sid, 4)
            k, v = kv(n, seed, fill)
            c.append(sid, 0, k, v, torch.zeros(n, 3, dtype=torch.int32, device=device))
        return c

    both = cache_with([("victim", 20, 1, None), ("poison", 5, 3, float("nan"))])
    q = torch.randn(16, h, d, generator=torch.Generator().manual_seed(2)).to(device)
    k, v = kv(7, 3)
    kp, vp = kv(9, 0, float("nan"))
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=device)
    out = be.forward(AttentionBatch(q, torch.cat([k, kp]), torch.cat([v, vp]), cu,
                                    both.view(["victim", "poison"], 0), 1 / math.sqrt(d)))
    alone = cache_with([("victim", 20, 1, None)])
    ref = be.forward(AttentionBatch(q[:7], k, v, cu[:2], alone.view(["victim"], 0), 1 / math.sqrt(d)))
    return {"victim_finite": bool(torch.isfinite(out[:7]).all()),
            "victim_vs_alone_max_abs_diff": float((out[:7] - ref).abs().max())}


def run_features(device, frames: int = 18) -> dict:
    """Every check (streams of ``frames`` latent frames, whole blocks), each recorded (or its error) without
    stopping the others."""
    out = {}
    for name, fn in (("fork", check_fork), ("rollback", check_rollback), ("isolation", check_isolation)):
        t0 = time.perf_counter()
        try:
            out[name] = fn(device, frames)
        except Exception as exc:  # noqa: BLE001 - recorded; the next check runs
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def limit_fractions(out: dict, model, cfg, device_name: str, page_size: int) -> dict:
    """Each experiment's steady seconds per block over the arithmetic lower bound for ``device_name``'s card
    (``ff_engine.limits``); empty where the card is neither an H100 nor an H200.  A bounded experiment's bound is
    at its budget; an unbounded one's at its final length (``cache_frames``), the largest cache it read, so its
    fraction is on the low side."""
    from ff_engine.limits import GPUS, block_cost, stream_limits
    from model_adapters import registry

    card = next((k for k in GPUS if k in device_name.upper()), None)
    if card is None:
        return {}
    g = model.geometry
    flops = registry.forward_flops(cfg)
    fractions = {}
    for name, ex in out["experiments"].items():
        lat = ex.get("step_latency_s") or []
        if len(lat) <= 3:
            continue
        steady = sum(lat[2:]) / len(lat[2:])
        cache_frames = ex.get("budget_frames") or out["frames"]
        cost = block_cost(cfg, g, flops, cache_frames * g.tokens_per_frame, page_size)
        bound = stream_limits(cost, GPUS[card], g.frames_per_block * g.vae_stride[0], g.fps)["block_seconds_min"]
        fractions[name] = {"steady_block_s": steady, "streams": ex.get("streams"), "cache_frames": cache_frames,
                           "bound_s_one_stream": bound,
                           "times_the_bound_per_stream": steady / (bound * max(1, ex.get("streams") or 1))}
    return {"card": card, "kind": "measured block time over the arithmetic lower bound (ff_engine.limits)",
            "experiments": fractions}
