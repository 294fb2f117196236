"""Long-horizon quality of every cache policy on the in-repo world model, against the unbounded cache.

For each held-out world seed (never used in training): the first ``--prefix`` ground-truth frames are written
into the cache (video extension), then ``--frames`` frames are generated with a fixed seed and noise, once
with the unbounded cache and once per (policy, budget).  Budgets are 12.5 / 25 / 50 % of the unbounded cache
at the end of the rollout.  Metrics (``model_adapters.world.metrics``): identity consistency and returning-subject
recall (pixel read-out), subject consistency (random-projection features, not DINO), rollout error against the
unbounded rollout, and per-layer attention-output error against the unbounded cache (teacher-forced: both
caches are fed the ground-truth clip, so the error measures what each policy keeps of real video whatever the
model's own rollouts look like; the relative error of the cache-writing pass's attention outputs).
In the same teacher-forced pass the model predicts every ``--predict-every``-th block from the policy's
ground-truth cache; those predictions are scored against the ground truth itself: latent MSE
(``tf_prediction_error``), identity recall of the subjects the ground truth shows (``tf_identity_recall``) and of
subjects coming back after >= 12 frames out of view (``tf_returning_identity_recall``) — identity consistency
against ground truth that does not depend on the model's own long rollouts staying on track.
The in-distribution length (the training clip, 24 frames) is scored on the first frames of the same rollout.
Free rollouts (``--rollout-seeds``, see ``free_rollouts``): ``--rollout-frames`` generated frames after the prefix
and from pure noise, every policy of ``policy_specs`` and the unbounded cache, scored without ground-truth
alignment (drift curve, returning-subject identity, colour read-out, VBench-style subject / background
consistency) and paired against Future Forcing by seed.  The memory probe (``memory_probe``) runs last.

    python benchmarks/quality.py            # all sections at their defaults (hours: see docs/benchmarks.md)
    python benchmarks/quality.py --quick    # CI smoke
    python benchmarks/quality.py --seeds 0 --probe-seeds 0 --rollout-seeds 4 --fractions 0.25 --workers 2 \
        --rollout-policies window expected-attention future-forcing     # free rollouts only
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, fraction, int_arg
from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.engine import reservation_pages
from ff_engine.policies import make_policy
from model_adapters.world import metrics as M
from model_adapters.world.procedural import EVAL_SEED_BASE, TRAIN_SEEDS, decode, encode, make_clip

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model_adapters" / "world" / "assets" / "world_model.safetensors"
TRAIN_CLIP = 24  # frames per training clip (model_adapters/world/train.py)


def policy_specs(budget: int) -> dict[str, tuple[str, dict]]:
    return {
        "window": ("window", {}),
        "sink-window": ("sink-window", {"sink_frames": 3}),
        "deep-sink": ("deep-sink", {"sink_frames": max(3, (budget // 2) // 3 * 3)}),
        "h2o": ("h2o", {"num_queries": 64}),
        "snapkv": ("snapkv", {"num_queries": 64}),
        "expected-attention": ("expected-attention", {}),  # kvpress's, faithful
        "expected-attention-post-rope": ("expected-attention-post-rope", {}),  # the earlier stand-in
        "future-forcing": ("future-forcing", {}),
        "ff-no-merge": ("future-forcing", {"merge": "none"}),
        "ff-affine-merge": ("future-forcing", {"merge": "affine"}),
        "ff-no-covariance": ("future-forcing", {"covariance": False}),
        "ff-no-value-norm": ("future-forcing", {"value_norm": False}),
        "ff-horizon-1": ("future-forcing", {"horizon": 1}),
        "ff-page-candidates": ("future-forcing", {"page_candidates": True}),
        "ff-page-bound": ("future-forcing", {"page_candidates": True, "page_rank": "bound"}),
        "ff-moment": ("future-forcing", {"form": "moment"}),
        "ff-exact-form": ("future-forcing", {"form": "exact"}),
        "ff-max": ("future-forcing", {"aggregation": "max"}),
        "ff-nocov-max": ("future-forcing", {"covariance": False, "aggregation": "max"}),
        "ff-importance-split": ("future-forcing", {"budget_split": "importance"}),
        "random": ("random", {}),
        "key-norm": ("key-norm", {}),
    }


EXPLORATORY = {"random", "key-norm", "ff-page-bound", "ff-moment", "ff-exact-form", "ff-max", "ff-nocov-max",
               "ff-importance-split"}  # settings studied once; run on request (--policies)
DEFAULT_POLICIES = [name for name in policy_specs(0) if name not in EXPLORATORY]  # every baseline and ablation


class AttentionTap:
    """Wraps an engine's backend and keeps each call's output per layer (for the attention-output error)."""

    def __init__(self, engine):
        self.inner, self.outputs, self.active = engine.backend, [], True
        engine.backend = self

    def validate(self, *a):
        return self.inner.validate(*a)

    def forward(self, batch):
        out = self.inner.forward(batch)
        if self.active:
            self.outputs.append(out.detach().clone())
        return out


def rollout(model, clip_lat, prefix, frames, policy, budget, seed, page_size, tap=None, teacher=None,
            predict_every=0, predict_at=(), predict=None):
    """Free rollout after a ground-truth prefix -> latents; or, with ``teacher``, a teacher-forced pass ->
    (attention outputs of the cache-writing passes if ``tap``, {frame: the model's prediction of the block
    starting there} every ``predict_every`` blocks and at the block starts in ``predict_at``; with only
    ``predict_at`` the pass stops after the last of them).  ``predict(engine, session)`` replaces the default
    prediction (the sampler's x0 of the block)."""
    g = model.geometry
    total = prefix + frames
    cfg = SessionConfig(prompt=torch.zeros(1, model.cfg.text_dim), num_frames=total, seed=seed, policy=policy,
                        budget_frames=budget)
    e = Engine(model, num_pages=reservation_pages(g, page_size, cfg), page_size=page_size, backend="torch")
    s = e.add_session(cfg)
    if prefix:  # video extension; without a prefix the rollout starts from pure noise
        e.prefill(s.id, clip_lat[:prefix])
    outs = AttentionTap(e) if tap else None
    if teacher is not None:  # teacher-forced: the cache is fed the reference latents block by block
        preds, first = {}, s.block
        last = max(predict_at) if predict_at and not predict_every else None
        while s.block < s.num_blocks:
            every = predict_every and (s.block - first) % predict_every == 0
            if every or s.start_frame in predict_at:  # what would the model make here?
                if outs:
                    outs.active = False
                preds[s.start_frame] = predict(e, s) if predict else e.denoise([s])[0].float()
                if outs:
                    outs.active = True
            if s.block == s.num_blocks - 1 or (last is not None and s.start_frame >= last):
                break
            if err := e.commit_block([s], teacher[s.start_frame:s.start_frame + g.frames_per_block][None],
                                     record=False):
                raise RuntimeError(f"teacher-forced block failed: {err}")
        e.cancel(s.id)
        return (outs.outputs if outs else None), preds
    while s.id in e.sessions:
        e.step([s.id])
    return torch.cat(s.latents)


PROBE_TIMESTEPS = (900.0, 750.0, 500.0)  # one-step denoising levels of the memory probe
PROBE_READOUT_T = 500.0


def probe_noise(lat, seed, starts, fpb):
    """{block start: noise} for the probed blocks of one seed: fixed per (seed, block), so every policy — and
    ``probe_picture.py`` — sees the same noisy input."""
    return {s0: torch.randn(lat[s0:s0 + fpb].shape, generator=torch.Generator().manual_seed(seed * 1000 + s0))
            for s0 in starts}


def one_step(engine, session, x0, noise, t):
    """The ground truth ``x0`` [F, C, H, W] noised at timestep ``t`` and the model's one-step x0 prediction of it
    from the session's cache (nothing written): (x_t [F, ...], prediction [F, ...]), float."""
    tt = torch.full((1, x0.shape[0]), t)
    xt = engine.schedule.add_noise(x0[None], noise[None], tt)
    pred = engine.schedule.to_x0(xt, engine.forward_block([session], xt, tt, write=False), tt)
    return xt[0].float(), pred[0].float()


@dataclass(frozen=True)
class ProbeJob:
    """The memory probe of one world ``seed``: every (policy, budget) in ``specs`` (plus the ground truth)."""

    seed: int
    specs: tuple
    history: int
    min_gap: int
    page_size: int


def probe_seed(model, job: ProbeJob) -> tuple[int, dict]:
    """(seed, {(policy, budget): {metric: [one value per probe]}}) for one seed of ``memory_probe``; {} when the
    seed has no return to probe."""
    seed, specs, history, min_gap, page_size = job.seed, job.specs, job.history, job.min_gap, job.page_size
    g = model.geometry
    fpb = g.frames_per_block
    clip = make_clip(seed, history)
    back = M.returning_pairs(clip.visible, min_gap=min_gap, window=fpb)  # first frames of each long-gap return
    starts = sorted({int(t) // fpb * fpb for t, _ in back.nonzero() if t >= 2 * fpb})
    if not starts:
        return seed, {}
    idx = [f for s0 in starts for f in range(s0, s0 + fpb)]
    pairs, centre, truth = back[idx], clip.centre[idx], clip.frames[idx]

    def hits(px):
        return M.readout_hits(px, clip.identity, centre, pairs).float().tolist()

    truth_hits = hits(truth)  # the read-out's ceiling
    result = {("ground-truth", None): {"returning_readout_sampled": truth_hits,
                                      "returning_readout_denoise": truth_hits,
                                      "returning_denoise_error": [0.0] * int(pairs.sum()),
                                      "returning_tokens_kept": []}}
    lat = encode(clip.frames)
    noise = probe_noise(lat, seed, starts, fpb)
    tokens = [M.subject_tokens(int(clip.identity[k]), clip.centre[:, k], clip.visible[:, k], g.token_grid)
              for k in range(clip.identity.numel())]

    def kept(e, s):
        """Per subject returning in this block: the share of its tokens in earlier frames that the cache
        still holds (mean over layers) — what the policy kept, independent of what the model makes of it."""
        s0 = s.start_frame
        cached = []  # per layer: positions of the cached tokens from earlier frames
        for layer in range(g.num_layers):
            pos = e.cache.positions.view(-1, 3)[e.cache.slots(s.id, layer)].long()
            cached.append(pos[pos[:, 0] < s0])
        share = []
        for k in back[s0:s0 + fpb].any(0).nonzero().flatten().tolist():
            total = max(int(tokens[k][:s0].sum()), 1)
            share.append(sum(int(tokens[k][p[:, 0], p[:, 1], p[:, 2]].sum()) / total for p in cached) / len(cached))
        return share

    def predict(e, s):
        x0, eps = lat[s.start_frame:s.start_frame + fpb], noise[s.start_frame]
        out = {"sampled": e.denoise([s])[0].float(), "kept": kept(e, s)}
        for t in PROBE_TIMESTEPS:
            out[t] = one_step(e, s, x0, eps, t)[1]
        return out

    for name, budget in specs:
        pname, params = ("unbounded", {}) if budget is None else policy_specs(budget)[name]
        _, preds = rollout(model, lat, fpb, history - fpb, make_policy(pname, **params), budget, seed, page_size,
                           teacher=lat, predict_at=set(starts), predict=predict)
        px = {k: decode(torch.cat([preds[s0][k] for s0 in starts])) for k in ["sampled", *PROBE_TIMESTEPS]}
        kept_share = [x for s0 in starts for x in preds[s0]["kept"]]
        errs = [M.subject_error(px[t], truth, clip.identity, centre, pairs) for t in PROBE_TIMESTEPS]
        result[(name, budget)] = {"returning_readout_sampled": hits(px["sampled"]),
                                  "returning_readout_denoise": hits(px[PROBE_READOUT_T]),
                                  "returning_denoise_error": [sum(e) / len(e) for e in zip(*errs)],
                                  "returning_tokens_kept": kept_share}
    return seed, result


def memory_probe(model, seeds, budgets, policies, history, min_gap, page_size, progress=True, pool=None):
    """Does the policy keep what the model needs when a subject comes back?  For each held-out world seed
    (``history`` ground-truth frames), every moment a subject returns after >= ``min_gap`` frames out of view
    (longer than the budget under test, so a window has evicted it) is a probe: the policy's cache is fed the
    ground truth up to that block, then at the block
      * the model denoises the ground truth noised at each of ``PROBE_TIMESTEPS`` (fixed noise, the same for every
        policy) in one step; ``returning_denoise_error`` is the pixel MSE of that x0 prediction on the subject's
        ground-truth pixels (mean over levels), ``returning_readout_denoise`` the colour read-out
        (``metrics.subject_readout``) of the prediction at ``PROBE_READOUT_T`` — the diffusion analogue of a
        language model's perplexity under a compressed cache: how much the cache helps to recognise the subject;
      * the sampler generates the block from pure noise; ``returning_readout_sampled`` is the colour read-out of
        that — which also needs the model to guess *where* the subject re-enters.
    Returns one row per (policy, budget) with means over all probes and the spread of per-seed means."""
    specs = [("unbounded", None)] + [(name, b) for b in budgets for name in policies]
    per = {k: {} for k in [("ground-truth", None)] + specs}  # (policy, budget) -> {seed: {metric: [values]}}
    jobs = [ProbeJob(seed, tuple(specs), history, min_gap, page_size) for seed in seeds]
    done = run_jobs(model, probe_seed, jobs, pool, "memory probe", progress)
    for seed, by_spec in sorted(done, key=lambda r: r[0]):  # seed order, however the workers finished
        for key, values in by_spec.items():
            per[key][seed] = values
    rows = []
    for (name, budget), by_seed in per.items():
        row = {"policy": name, "budget_frames": budget,
               "probes": sum(len(v["returning_denoise_error"]) for v in by_seed.values())}
        for m in PROBE_METRICS:
            flat = [x for v in by_seed.values() for x in v[m]]
            seed_means = [sum(v[m]) / len(v[m]) for v in by_seed.values() if v[m]]
            row[m] = sum(flat) / len(flat) if flat else float("nan")
            row[m + "_seed_std"] = statistics.pstdev(seed_means) if len(seed_means) > 1 else 0.0
        row["per_seed"] = {str(k): v for k, v in by_seed.items()}
        rows.append(row)
    return rows


PROBE_METRICS = ["returning_denoise_error", "returning_readout_denoise", "returning_readout_sampled",
                 "returning_tokens_kept"]


def paired_differences(probe, reference="future-forcing", resamples=2000, metrics=PROBE_METRICS):
    """Every policy minus ``reference`` on the same probes (same seeds, same returns, same noise): the mean
    difference of each of ``metrics`` and a 90 % interval from a bootstrap over seeds (seeds resampled with their
    probes, as the probes of one seed are not independent).  Policies are compared on identical probes, so this
    is much tighter than the seed spread of each policy's own mean."""
    ref = {r["budget_frames"]: r for r in probe if r["policy"] == reference}
    g = torch.Generator().manual_seed(0)
    out = []
    for r in probe:
        base = ref.get(r["budget_frames"]) or next(iter(ref.values()), None)
        if base is None or r is base or r["policy"] == "ground-truth":
            continue
        seeds = sorted(set(r["per_seed"]) & set(base["per_seed"]))
        if not seeds:  # no seed had a return to probe
            continue
        item = {"policy": r["policy"], "budget_frames": r["budget_frames"], "reference": reference}
        for m in metrics:
            diffs = [[a - b for a, b in zip(r["per_seed"][k][m], base["per_seed"][k][m])] for k in seeds]
            sums = torch.tensor([sum(d) for d in diffs], dtype=torch.float64)
            counts = torch.tensor([len(d) for d in diffs], dtype=torch.float64)
            idx = torch.randint(len(seeds), (resamples, len(seeds)), generator=g)
            boot = sums[idx].sum(1) / counts[idx].sum(1).clamp_min(1)
            item[m] = float(sums.sum() / counts.sum())
            item[m + "_ci90"] = [float(boot.quantile(0.05)), float(boot.quantile(0.95))]
        out.append(item)
    return out


# ---- free rollouts: generated frames from a ground-truth prefix or from pure noise, no alignment needed ------

ROLLOUT_SEED_BASE = EVAL_SEED_BASE + 2000  # held-out worlds; the main run uses +0.., the memory probe +1000..
ROLLOUT_STARTS = ("prefix", "noise")
ROLLOUT_METRICS = ["returning_identity_consistency", "identity_consistency", "drift_ratio", "drift_first",
                   "drift_last", "subject_consistency", "background_consistency", "world_presence", "foreign_presence"]


def to_budget(fraction: float, total: int, fpb: int) -> int:
    """A budget fraction of a ``total``-frame unbounded cache, in whole blocks (at least two)."""
    return max(2 * fpb, round(fraction * total / fpb) * fpb)


@dataclass(frozen=True)
class RolloutJob:
    """One free rollout: world ``seed``, ``start`` "prefix" (``prefix`` ground-truth frames written first) or
    "noise" (generation from pure noise, seeded by ``seed``), ``frames`` generated frames under ``policy`` (a
    ``policy_specs`` name or "unbounded") at ``budget`` frames."""

    seed: int
    start: str
    policy: str
    budget: int | None
    prefix: int
    frames: int
    page_size: int
    return_gap: int


def rollout_jobs(seeds, starts, fractions, policies, prefix, frames, page_size, return_gap, fpb) -> list[RolloutJob]:
    """Every (seed, start, policy, budget) plus each (seed, start)'s unbounded rollout; budgets are ``fractions``
    of what the unbounded cache holds at the end (prefix + generated frames, or generated frames from noise)."""
    jobs = []
    for seed in seeds:
        for start in starts:
            p = prefix if start == "prefix" else 0
            jobs.append(RolloutJob(seed, start, "unbounded", None, p, frames, page_size, return_gap))
            for b in sorted({to_budget(f, p + frames, fpb) for f in fractions}):
                jobs += [RolloutJob(seed, start, n, b, p, frames, page_size, return_gap) for n in policies]
    return jobs


def score_rollout(px: torch.Tensor, start: str, prefix: int, identity: torch.Tensor | None, return_gap: int) -> dict:
    """The free-rollout metrics of one video ``px`` [prefix + frames, 3, H, W] (ground truth first, then
    generated).  The world's subjects are the clip's (``metrics.world_from_truth``) after a prefix, and the first
    ones the rollout establishes (``metrics.world_from_sightings``) from noise; colour consistency counts the
    generated frames from the first frame a world subject is known."""
    gen = px[prefix:]
    colours, shapes = M.subject_sightings(px)
    world = M.world_from_truth(identity, prefix) if start == "prefix" else M.world_from_sightings(colours, shapes)
    known = min(world.known_from.values(), default=len(px))
    curve = M.drift_curve(gen)
    row = {"drift_curve": curve, "drift_ratio": M.drift_ratio(curve), "drift_first": curve[0], "drift_last": curve[-1],
           "identity_consistency": M.world_colour_consistency(colours[known:], world),
           "returning_identity_consistency": M.returning_identity_consistency(colours, shapes, world, return_gap),
           "returning_events": len(M.returning_events(colours, world, return_gap)),
           "subject_consistency": M.subject_consistency(gen), "background_consistency": M.background_consistency(gen),
           "world": {str(k): v for k, v in world.subjects.items()},
           "world_known_from": {str(k): v for k, v in world.known_from.items()},
           **M.colour_presence(colours[prefix:], world)}
    if prefix >= M.DRIFT_WINDOW:
        row["drift_prefix"] = M.drift_curve(px[:prefix])[-1]  # the ground truth's own level in this world
    return row


def run_rollout(model, job: RolloutJob) -> dict:
    """Generate and score one ``RolloutJob`` -> a result row (with its wall and CPU time: ``seconds``,
    ``cpu_seconds``; on a shared box the CPU time is the one to extrapolate from)."""
    t0, c0 = time.perf_counter(), time.process_time()
    clip = make_clip(job.seed, job.prefix + job.frames) if job.prefix else None
    lat = encode(clip.frames) if clip else None
    pname, params = ("unbounded", {}) if job.budget is None else policy_specs(job.budget)[job.policy]
    px = decode(rollout(model, lat, job.prefix, job.frames, make_policy(pname, **params), job.budget, job.seed,
                        job.page_size))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    total = job.prefix + job.frames
    return {"seed": job.seed, "start": job.start, "policy": job.policy, "budget_frames": job.budget,
            "budget_fraction": None if job.budget is None else job.budget / total, "prefix": job.prefix,
            "frames": job.frames, "seconds": seconds, "cpu_seconds": cpu_seconds,
            **score_rollout(px, job.start, job.prefix, clip.identity if clip else None, job.return_gap)}


def ground_truth_rollouts(seeds, prefix, frames, return_gap) -> list[dict]:
    """The ground-truth continuation of each prefix world, scored like a rollout: the metrics' ceiling and the
    drift ratio of real video (about 1)."""
    rows = []
    for seed in seeds:
        clip = make_clip(seed, prefix + frames)
        rows.append({"seed": seed, "start": "prefix", "policy": "ground-truth", "budget_frames": None,
                     "budget_fraction": None, "prefix": prefix, "frames": frames, "seconds": 0.0, "cpu_seconds": 0.0,
                     **score_rollout(clip.frames, "prefix", prefix, clip.identity, return_gap)})
    return rows


_WORKER_MODEL = None


def _init_worker(model_path: str) -> None:
    """Pool initializer: one model per worker process, one thread each (the workers share the cores)."""
    global _WORKER_MODEL
    from model_adapters import registry

    torch.set_num_threads(1)
    _WORKER_MODEL = registry.load(model_path, "world-tiny")


def _worker_call(fn_job):
    fn, job = fn_job
    return fn(_WORKER_MODEL, job)


@contextlib.contextmanager
def worker_pool(model_path: str, workers: int):
    """``workers`` spawned processes that each load ``model_path`` once (one torch thread each), or None for 1
    (spawn, not fork: a forked child of a process that has run torch's OpenMP pool can hang)."""
    if workers <= 1:
        yield None
        return
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(model_path,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def run_jobs(model, fn, jobs, pool, desc, progress=True):
    """Yield ``fn(model, job)`` for each of ``jobs`` as it finishes, with a progress bar: in this process, or on
    ``pool``'s workers (their own model; order not kept).  ``fn`` must be a module-level function."""
    from tqdm import tqdm

    results = (fn(model, j) for j in jobs) if pool is None else pool.imap_unordered(_worker_call, [(fn, j) for j in jobs])
    yield from tqdm(results, total=len(jobs), desc=desc, disable=not progress)


def free_rollouts(model, a, out, path, pool) -> None:
    """The free-rollout section of ``main``: every ``RolloutJob`` of the arguments ``a`` and the ground truth, into
    ``out`` (``rollouts``, ``rollout_summary``, ``rollouts_vs_future_forcing``), written to ``path`` as it goes."""
    seeds = [ROLLOUT_SEED_BASE + i for i in range(a.rollout_seeds)]
    jobs = rollout_jobs(seeds, a.rollout_start, a.fractions, a.rollout_policies, a.prefix, a.rollout_frames,
                        a.page_size, a.return_gap, model.geometry.frames_per_block)
    rows = ground_truth_rollouts(seeds, a.prefix, a.rollout_frames, a.return_gap) if "prefix" in a.rollout_start else []
    out.update(rollouts=rows, rollout_setup={
        "seeds": seeds, "starts": a.rollout_start, "prefix": a.prefix, "frames": a.rollout_frames,
        "fractions": a.fractions, "policies": a.rollout_policies, "return_gap": a.return_gap,
        "drift_window": M.DRIFT_WINDOW, "workers": a.workers})
    last_write = time.perf_counter()
    for row in run_jobs(model, run_rollout, jobs, pool, "free rollouts"):
        rows.append(row)
        if time.perf_counter() - last_write > 20:  # a long run that dies still leaves its finished rollouts
            path.write_text(json.dumps(out, indent=1))
            last_write = time.perf_counter()
    rows.sort(key=lambda r: (r["start"], r["seed"], r["policy"], r["budget_frames"] or 0))
    out.update(rollout_summary=summarise_rollouts(rows), rollouts_vs_future_forcing=paired_rollouts(rows))
    path.write_text(json.dumps(out, indent=1))


def _mean_std(vals):
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), 0.0, 0
    return statistics.mean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0), len(vals)


def summarise_rollouts(rows) -> list[dict]:
    """Per (start, policy, budget): mean and seed std of each of ``ROLLOUT_METRICS`` (NaN rollouts left out,
    ``<metric>_n`` says how many counted), the seed-mean drift curve and its last / first window."""
    groups = {}
    for r in rows:
        groups.setdefault((r["start"], r["policy"], r["budget_frames"]), []).append(r)
    out = []
    for (start, p, b), rs in groups.items():
        item = {"start": start, "policy": p, "budget_frames": b, "budget_fraction": rs[0]["budget_fraction"],
                "n": len(rs), "returning_events": sum(r["returning_events"] for r in rs),
                "seconds": statistics.mean(r["seconds"] for r in rs),
                "cpu_seconds": statistics.mean(r["cpu_seconds"] for r in rs)}
        for m in ROLLOUT_METRICS:
            item[m], item[m + "_std"], item[m + "_n"] = _mean_std([r[m] for r in rs])
        curve = [statistics.mean(x) for x in zip(*(r["drift_curve"] for r in rs))]
        item["drift_curve"], item["drift_ratio_of_means"] = curve, M.drift_ratio(curve)
        item["world_presence_curve"] = [statistics.mean(x) for x in zip(*(r["world_presence_curve"] for r in rs))]
        out.append(item)
    return out


def paired_rollouts(rows, reference="future-forcing") -> list[dict]:
    """Each policy (and the unbounded cache) minus ``reference`` at the same budget on the same rollouts (same
    world, same noise), per start: mean difference of each of ``ROLLOUT_METRICS`` and a 90 % interval from a
    bootstrap over seeds (``paired_differences``; a seed where either side is NaN is left out of that metric)."""
    out = []
    for start in sorted({r["start"] for r in rows}):
        mine = [r for r in rows if r["start"] == start and r["policy"] != "ground-truth"]
        for budget in sorted({r["budget_frames"] for r in mine if r["budget_frames"] is not None}):
            by = {}
            for r in mine:
                if r["budget_frames"] in (budget, None):
                    seed_values = {m: [] if math.isnan(r[m]) else [r[m]] for m in ROLLOUT_METRICS}
                    by.setdefault(r["policy"], {})[str(r["seed"])] = seed_values
            items = [{"policy": p, "budget_frames": budget, "per_seed": v} for p, v in by.items()]
            out += [dict(d, start=start) for d in paired_differences(items, reference, metrics=ROLLOUT_METRICS)]
    return out


def print_rollouts(summary, paired) -> None:
    cols = [("returning_identity_consistency", "ret-id", 7, 3), ("identity_consistency", "id-cons", 7, 3),
            ("drift_ratio_of_means", "drift×", 6, 2), ("drift_first", "drift0", 7, 1), ("drift_last", "drift-1", 7, 1),
            ("subject_consistency", "subj", 6, 3), ("background_consistency", "bg", 6, 3),
            ("world_presence", "world", 6, 3), ("foreign_presence", "foreign", 7, 3)]
    for start in sorted({s["start"] for s in summary}):
        print(f"free rollouts from {start} (mean over seeds; drift× = last / first window of the mean drift curve):")
        print(f"  {'policy':28s} {'budget':>6s} {'n':>3s} {'events':>6s} " + " ".join(f"{h:>{w}s}" for _, h, w, _ in cols))
        for s in sorted((s for s in summary if s["start"] == start), key=lambda s: (s["budget_frames"] or 1e9, s["policy"])):
            print(f"  {s['policy']:28s} {s['budget_frames']!s:>6s} {s['n']:3d} {s['returning_events']:6d} "
                  + " ".join(f"{s[k]:{w}.{d}f}" for k, _, w, d in cols))
        rows = [r for r in paired if r["start"] == start]
        if rows:
            print("  minus future-forcing on the same rollouts (90 % seed-bootstrap interval): ret-id, drift ratio, bg")
            for r in sorted(rows, key=lambda r: (r["budget_frames"], r["policy"])):
                print(f"  {r['policy']:28s} {r['budget_frames']:>6d} " + " ".join(
                    f"{r[m]:+.3f} [{r[m + '_ci90'][0]:+.3f}, {r[m + '_ci90'][1]:+.3f}]"
                    for m in ("returning_identity_consistency", "drift_ratio", "background_consistency")))


def drift_figure(result, png):
    """``benchmarks/filmstrip.py``'s drift figure (that file is a script beside this one, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ff_filmstrip", Path(__file__).parent / "filmstrip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.drift_figure(result, png)


def layer_errors(outputs, ref_outputs, num_layers):
    errs = [[] for _ in range(num_layers)]
    for i, (a, b) in enumerate(zip(outputs, ref_outputs)):
        errs[i % num_layers].append(float((a - b).norm() / b.norm().clamp_min(1e-12)))
    return [statistics.mean(e) for e in errs]


def filmstrip(model, seed, prefix, frames, budget, page_size, png, policies=("window", "sink-window", "future-forcing"),
              every=6):
    """One held-out seed as pictures: ground truth, the unbounded rollout and each policy at ``budget``, every
    ``every``-th frame (the prefix is ground truth in every row)."""
    total = prefix + frames
    clip = make_clip(seed, total)
    lat = encode(clip.frames)
    rows = {"ground truth": clip.frames,
            "unbounded": decode(rollout(model, lat, prefix, frames, make_policy("unbounded"), None, seed, page_size))}
    for name in policies:
        pname, params = policy_specs(budget)[name]
        rows[f"{name} ({budget} fr)"] = decode(rollout(model, lat, prefix, frames, make_policy(pname, **params), budget,
                                                      seed, page_size))
    idx = list(range(0, total, every))
    image_grid([[px[t] for t in idx] for px in rows.values()], list(rows),
               [f"{t}" + (" (prefix)" if t < prefix else "") for t in idx],
               f"held-out world seed {seed}: frames 0-{total - 1}, first {prefix} are the given prefix", png,
               figsize=(0.9 * len(idx), 0.75 * len(rows) + 0.4))


def image_grid(cells, row_labels, col_titles, title, png, figsize):
    """Save a grid of [3, h, w] images in [-1, 1] (``cells[row][col]``), rows labelled on the left, columns
    titled on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cells), len(cells[0]), figsize=figsize, squeeze=False)
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            ax = axes[r, c]
            ax.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(col_titles[c], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int_arg(0), default=5, help="teacher-forced + 96-frame rollout seeds (0: none)")
    ap.add_argument("--prefix", type=int_arg(1), default=24, help="ground-truth frames written into the cache first")
    ap.add_argument("--frames", type=int_arg(1), default=96, help="generated frames (4x the training clip)")
    ap.add_argument("--fractions", type=fraction, nargs="+", default=[0.125, 0.25, 0.5])
    ap.add_argument("--policies", nargs="*", default=DEFAULT_POLICIES, choices=list(policy_specs(0)))
    ap.add_argument("--filmstrip-fraction", type=fraction, default=0.25, help="budget fraction shown in the filmstrip")
    ap.add_argument("--page-size", type=int_arg(1), default=16)
    ap.add_argument("--predict-every", type=int_arg(1), default=2,
                    help="teacher-forced pass: predict every n-th block from the policy's ground-truth cache")
    ap.add_argument("--rollout-seeds", type=int_arg(0), default=8,
                    help=f"free rollouts: held-out worlds ({ROLLOUT_SEED_BASE} + i; 0: none)")
    ap.add_argument("--rollout-frames", type=int_arg(M.DRIFT_WINDOW), default=240,
                    help=f"free rollouts: generated frames (drift is scored per {M.DRIFT_WINDOW}-frame window)")
    ap.add_argument("--rollout-start", nargs="+", choices=ROLLOUT_STARTS, default=list(ROLLOUT_STARTS),
                    help="free rollouts: after the --prefix ground-truth frames, and/or from pure noise")
    ap.add_argument("--rollout-policies", nargs="*", default=list(policy_specs(0)), choices=list(policy_specs(0)),
                    help="free rollouts: policies (default: every one in policy_specs), each at every --fractions budget")
    ap.add_argument("--return-gap", type=int_arg(1), default=M.DRIFT_WINDOW,
                    help="free rollouts: a subject comes back after this many frames without its identity")
    ap.add_argument("--workers", type=int_arg(1), default=1,
                    help="free rollouts and memory probe: processes (one torch thread each; 2 on the 2-core box)")
    ap.add_argument("--probe-seeds", type=int_arg(0), default=48, help="memory probe: held-out seeds (0: no probe)")
    ap.add_argument("--probe-history", type=int_arg(1), default=192, help="memory probe: ground-truth frames per seed")
    ap.add_argument("--probe-min-gap", type=int_arg(0), default=30,
                    help="memory probe: a return counts after this many frames out of view")
    ap.add_argument("--probe-fractions", type=fraction, nargs="+", default=[0.25],
                    help="memory probe: budgets (same frame budgets as the main run's fractions)")
    ap.add_argument("--probe-only", action="store_true", help="run only the memory probe (no main seeds, no rollouts)")
    ap.add_argument("--probe-on-training-seeds", action="store_true",
                    help="probe training seeds (20000 + 613 i) instead of held-out ones: for studying policy "
                         "settings without touching the evaluation seeds")
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    ap.add_argument("--filmstrip-policies", nargs="*", default=["window", "sink-window", "future-forcing"],
                    choices=list(policy_specs(0)),
                    help="policies shown in the filmstrip picture of the first seed (none: no picture)")
    ap.add_argument("--filmstrip-every", type=int_arg(1), default=6, help="show every n-th frame in the filmstrip")
    a = ap.parse_args(argv)
    from model_adapters import registry

    model = registry.load(a.model, "world-tiny")
    g = model.geometry
    if a.quick:
        a.seeds, a.frames, a.fractions = 2, 24, [0.25]
        a.policies = ["window", "sink-window", "expected-attention", "future-forcing"]
        a.probe_seeds, a.probe_history, a.probe_min_gap = min(a.probe_seeds, 2), 72, 15
        a.rollout_seeds, a.rollout_frames = min(a.rollout_seeds, 2), M.DRIFT_WINDOW
        a.rollout_policies = ["window", "expected-attention", "future-forcing"]
    total = a.prefix + a.frames
    budgets = sorted({to_budget(f, total, g.frames_per_block) for f in a.fractions})
    strip_budget = min(budgets, key=lambda b: abs(b / total - a.filmstrip_fraction))
    if a.probe_only:
        a.seeds = a.rollout_seeds = 0
    rows, t0 = [], time.perf_counter()
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "quality", "model": a.model, "quick": a.quick, "seeds": a.seeds, "prefix": a.prefix,
           "frames": a.frames, "budgets": budgets, "rows": rows, "summary": [], "partial": True}
    for si in range(a.seeds):
        seed = EVAL_SEED_BASE + si
        clip = make_clip(seed, total)
        lat = encode(clip.frames)
        ref = rollout(model, lat, a.prefix, a.frames, make_policy("unbounded"), None, seed, a.page_size)
        ref_att, ref_preds = rollout(model, lat, a.prefix, a.frames, make_policy("unbounded"), None, seed,
                                     a.page_size, tap=True, teacher=lat, predict_every=a.predict_every)
        returning = M.returning_pairs(clip.visible)
        base = {"seed": seed, "prefix": a.prefix, "frames": a.frames}

        def teacher_forced(preds):
            """Predictions of blocks from ground-truth caches, scored against the ground truth itself."""
            idx = [f for s0 in sorted(preds) for f in range(s0, s0 + g.frames_per_block)]
            pred = torch.cat([preds[s0] for s0 in sorted(preds)])
            px = decode(pred)
            return {"tf_prediction_error": M.rollout_error(pred, lat[idx]),
                    "tf_identity_recall": M.identity_recall(px, clip.identity, clip.visible[idx]),
                    "tf_returning_identity_recall": M.identity_recall(px, clip.identity, returning[idx]),
                    "tf_identity_readout": M.identity_readout_accuracy(px, clip.identity, clip.centre[idx],
                                                                       clip.visible[idx])}

        def score(name, budget, latents, att, preds):
            px = decode(latents)
            cont = px[a.prefix:]
            row = dict(base, policy=name, budget_frames=budget,
                       budget_fraction=None if budget is None else budget / total,
                       identity_consistency=M.identity_consistency(cont, clip.identity),
                       identity_consistency_in_dist=M.identity_consistency(cont[:TRAIN_CLIP], clip.identity),
                       returning_recall=M.returning_recall(px[: a.prefix], cont, clip.identity),
                       subject_consistency=M.subject_consistency(cont),
                       rollout_error=M.rollout_error(latents[a.prefix:], ref[a.prefix:]),
                       rollout_error_in_dist=M.rollout_error(latents[a.prefix:a.prefix + TRAIN_CLIP],
                                                             ref[a.prefix:a.prefix + TRAIN_CLIP]),
                       attention_error_per_layer=att, **teacher_forced(preds))
            rows.append(row)

        score("unbounded", None, ref, [0.0] * g.num_layers, ref_preds)
        for budget in budgets:
            for name, (pname, params) in policy_specs(budget).items():
                if name not in a.policies:
                    continue
                pol = make_policy(pname, **params)
                lats = rollout(model, lat, a.prefix, a.frames, pol, budget, seed, a.page_size)
                outs, preds = rollout(model, lat, a.prefix, a.frames, make_policy(pname, **params), budget, seed,
                                      a.page_size, tap=True, teacher=lat, predict_every=a.predict_every)
                score(name, budget, lats, layer_errors(outs, ref_att, g.num_layers), preds)
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
        out["summary"] = summarise(rows)
        path.write_text(json.dumps(out, indent=1))  # a long run that dies still leaves its finished seeds
    with worker_pool(a.model, a.workers if (a.rollout_seeds or a.probe_seeds) else 1) as pool:
        if a.rollout_seeds:
            free_rollouts(model, a, out, path, pool)
            print(f"free rollouts done ({time.perf_counter() - t0:.0f}s)", flush=True)
        probe = []
        if a.probe_seeds:
            if a.probe_on_training_seeds:
                probe_seeds = [TRAIN_SEEDS[20_000 + 613 * i] for i in range(a.probe_seeds)]
            else:
                probe_seeds = [EVAL_SEED_BASE + 1000 + i for i in range(a.probe_seeds)]
            probe_budgets = sorted({to_budget(f, total, g.frames_per_block) for f in a.probe_fractions})
            probe = memory_probe(model, probe_seeds, probe_budgets, a.policies, a.probe_history, a.probe_min_gap,
                                 a.page_size, pool=pool)
            print(f"memory probe done ({time.perf_counter() - t0:.0f}s)", flush=True)
    # the comparison issue #17 asks for: video-aware future + merging against kvpress's sequence-order future
    out.update(partial=False, memory_probe=probe, memory_probe_vs_future_forcing=paired_differences(probe),
               memory_probe_vs_expected_attention=paired_differences(probe, "expected-attention"),
               memory_probe_setup={"seeds": a.probe_seeds, "history": a.probe_history, "min_gap": a.probe_min_gap,
                                   "training_seeds": a.probe_on_training_seeds})
    summary = out["summary"]
    path.write_text(json.dumps(out, indent=1))
    if summary:
        plot(summary, budgets, total, path.with_suffix(".png"), probe, out["memory_probe_vs_future_forcing"])
    if not a.quick and a.filmstrip_policies and a.seeds:
        filmstrip(model, EVAL_SEED_BASE, a.prefix, a.frames, strip_budget, a.page_size,
                  path.with_name(path.stem + "_filmstrip.png"), policies=a.filmstrip_policies, every=a.filmstrip_every)
    print_table(summary)
    if a.rollout_seeds:
        print_rollouts(out["rollout_summary"], out["rollouts_vs_future_forcing"])
        drift_figure(out, path.with_name(path.stem + "_drift.png"))
    if probe:
        print(f"memory probe ({a.probe_seeds} seeds x {a.probe_history} frames, returns after >= {a.probe_min_gap} "
              f"frames out of view, {probe[0]['probes']} probes; mean ± seed spread):")
        print(f"  {'policy':22s} {'budget':>6s} {'denoise-err':>11s} {'readout@500':>11s} {'readout-sampled':>15s} "
              f"{'tokens-kept':>11s}")
        for r in sorted(probe, key=lambda r: (r["budget_frames"] or 1e9, r["returning_denoise_error"])):
            print(f"  {r['policy']:22s} {r['budget_frames']!s:>6s} " + " ".join(
                f"{r[m]:.3f}±{r[m + '_seed_std']:.3f}".rjust(w) for m, w in zip(PROBE_METRICS, (11, 11, 15, 11))))
        for key, ref in (("memory_probe_vs_future_forcing", "future-forcing"),
                         ("memory_probe_vs_expected_attention", "expected-attention")):
            if out[key]:
                print_probe_differences(out[key], ref)
    print(f"wrote {path}")


def print_probe_differences(diffs, reference):
    print(f"  minus {reference} on the same probes (90 % seed-bootstrap interval):")
    for r in sorted(diffs, key=lambda r: r["returning_denoise_error"]):
        print(f"  {r['policy']:22s} {r['budget_frames']!s:>6s} " + " ".join(
            f"{r[m]:+.3f} [{r[m + '_ci90'][0]:+.3f}, {r[m + '_ci90'][1]:+.3f}]" for m in (*PROBE_METRICS[:2], PROBE_METRICS[3])))


METRICS = ["identity_consistency", "identity_consistency_in_dist", "returning_recall", "subject_consistency",
           "rollout_error", "rollout_error_in_dist", "tf_prediction_error", "tf_identity_recall",
           "tf_returning_identity_recall", "tf_identity_readout"]


def summarise(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["policy"], r["budget_frames"]), []).append(r)
    out = []
    for (p, b), rs in groups.items():
        item = {"policy": p, "budget_frames": b, "n": len(rs)}
        for m in METRICS:
            vals = [r[m] for r in rs if not (isinstance(r[m], float) and math.isnan(r[m]))]
            item[m] = statistics.mean(vals) if vals else float("nan")
            item[m + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        att = [r["attention_error_per_layer"] for r in rs if r["attention_error_per_layer"] is not None]
        per_seed = [sum(a) / len(a) for a in att]
        item["attention_error_mean"] = statistics.mean(per_seed) if att else float("nan")
        item["attention_error_mean_std"] = statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0
        item["attention_error_per_layer"] = [statistics.mean(x) for x in zip(*att)] if att else None
        out.append(item)
    return out


def print_table(summary):
    cols = [("tf_identity_readout", "tf-read", 7, 3), ("tf_identity_recall", "tf-id", 7, 3), ("tf_returning_identity_recall", "tf-ret", 7, 3),
            ("tf_prediction_error", "tf-mse", 8, 4), ("attention_error_mean", "attn-err", 8, 4),
            ("rollout_error_in_dist", "roll24", 8, 4), ("rollout_error", "rollout", 8, 4),
            ("identity_consistency", "id-cons", 7, 3), ("subject_consistency", "subj", 6, 3)]
    print(f"{'policy':22s} {'budget':>6s} " + " ".join(f"{h:>{w}s}" for _, h, w, _ in cols))
    for s in sorted(summary, key=lambda s: (s["budget_frames"] or 1e9, s["policy"])):
        print(f"{s['policy']:22s} {s['budget_frames']!s:>6s} " + " ".join(f"{s[k]:{w}.{d}f}" for k, _, w, d in cols))


def plot(summary, budgets, total, png, probe=(), paired=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("tf_identity_readout", "identity read-out vs ground truth (teacher-forced)"),
            ("tf_identity_recall", "identity recall, threshold detector (teacher-forced)"),
            ("tf_prediction_error", "prediction MSE vs ground truth (teacher-forced)"),
            ("attention_error_mean", "attention-output rel. error (teacher-forced)"),
            ("rollout_error_in_dist", "rollout MSE vs unbounded, first 24 frames"),
            ("rollout_error", "rollout MSE vs unbounded, all generated frames"),
            ("subject_consistency", "subject consistency (random features, not DINO)")]
    fig, axes = plt.subplots(2, 4, figsize=(22, 8.5))
    axes = axes.flatten()
    unb = next(s for s in summary if s["policy"] == "unbounded")
    for ax, (k, title) in zip(axes, keys):
        for name in sorted({s["policy"] for s in summary if s["policy"] != "unbounded"}):
            pts = sorted((s["budget_frames"] / total, s[k], s.get(k + "_std", 0.0)) for s in summary if s["policy"] == name)
            style = "-" if name.startswith(("future", "ff-")) else "--"
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ls=style,
                        capsize=2, label=name)
        ax.axhline(unb[k], color="k", lw=1, label="unbounded")
        ax.set(xlabel="budget (fraction of the unbounded cache)", title=title)
    axes[0].legend(fontsize=7, ncol=2)
    ax = axes[-1]
    if paired:  # the memory probe, paired against Future Forcing on the same probes
        rows = sorted(paired, key=lambda r: r["returning_readout_denoise"])
        absolute = {(r["policy"], r["budget_frames"]): r["returning_readout_denoise"] for r in probe}
        y = list(range(len(rows)))
        mid = [r["returning_readout_denoise"] for r in rows]
        lo = [m - r["returning_readout_denoise_ci90"][0] for m, r in zip(mid, rows)]
        hi = [r["returning_readout_denoise_ci90"][1] - m for m, r in zip(mid, rows)]
        ax.errorbar(mid, y, xerr=[lo, hi], fmt="o", capsize=3)
        ax.axvline(0, color="tab:red", lw=1)
        ax.set_yticks(y, [f"{r['policy']}" + ("" if r["budget_frames"] is None else f" @{r['budget_frames']}")
                          + f" ({absolute[(r['policy'], r['budget_frames'])]:.2f})" for r in rows], fontsize=7)
        ff = next((r["returning_readout_denoise"] for r in probe if r["policy"] == "future-forcing"), float("nan"))
        ax.set(xlabel=f"returning-subject read-out minus future-forcing ({ff:.2f}); 90 % CI",
               title=f"memory probe ({probe[0]['probes']} returns)")
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=90)

if __name__ == "__main__":
    main()
