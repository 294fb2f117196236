"""The memory probe: does a policy keep what the model needs when a subject comes back into view?

See ``memory_probe`` for the measurement; its rows feed ``stats.paired_differences``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ff_engine.evaluation.pool import run_jobs
from ff_engine.evaluation.rollout import rollout
from ff_engine.evaluation.specs import policy_specs
from ff_engine.policies import make_policy
from model_adapters.world import metrics as M
from model_adapters.world.procedural import decode, encode, make_clip

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
