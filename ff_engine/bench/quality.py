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

import json
import math
import statistics
import time
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, fraction, int_arg
from ff_engine.bench import RESULTS_DIR
from ff_engine.evaluation import (
    DEFAULT_POLICIES,
    PROBE_METRICS,
    ROLLOUT_SEED_BASE,
    ROLLOUT_STARTS,
    TRAIN_CLIP,
    ground_truth_rollouts,
    image_grid,
    layer_errors,
    memory_probe,
    paired_differences,
    paired_rollouts,
    policy_specs,
    rollout,
    rollout_jobs,
    run_jobs,
    run_rollout,
    summarise_rollouts,
    to_budget,
    worker_pool,
)
from ff_engine.policies import make_policy
from model_adapters.world import EMBEDDED_CHECKPOINT
from model_adapters.world import metrics as M
from model_adapters.world.procedural import EVAL_SEED_BASE, TRAIN_SEEDS, decode, encode, make_clip

RESULTS = RESULTS_DIR


DEFAULT_MODEL = EMBEDDED_CHECKPOINT


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
    """``ff-engine bench filmstrip``'s drift figure (imported here, so the quality run draws it as it finishes)."""
    from ff_engine.bench.filmstrip import drift_figure as draw

    draw(result, png)


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


def _parser() -> OneLineParser:
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
    return ap


def _quick(a) -> None:
    """``--quick``: the CI-smoke sizes."""
    a.seeds, a.frames, a.fractions = 2, 24, [0.25]
    a.policies = ["window", "sink-window", "expected-attention", "future-forcing"]
    a.probe_seeds, a.probe_history, a.probe_min_gap = min(a.probe_seeds, 2), 72, 15
    a.rollout_seeds, a.rollout_frames = min(a.rollout_seeds, 2), M.DRIFT_WINDOW
    a.rollout_policies = ["window", "expected-attention", "future-forcing"]


def _teacher_forced(preds, lat, clip, returning, frames_per_block) -> dict:
    """Predictions of blocks from ground-truth caches, scored against the ground truth itself."""
    idx = [f for s0 in sorted(preds) for f in range(s0, s0 + frames_per_block)]
    pred = torch.cat([preds[s0] for s0 in sorted(preds)])
    px = decode(pred)
    return {"tf_prediction_error": M.rollout_error(pred, lat[idx]),
            "tf_identity_recall": M.identity_recall(px, clip.identity, clip.visible[idx]),
            "tf_returning_identity_recall": M.identity_recall(px, clip.identity, returning[idx]),
            "tf_identity_readout": M.identity_readout_accuracy(px, clip.identity, clip.centre[idx],
                                                               clip.visible[idx])}


def _score_seed(model, a, seed, total, budgets, rows) -> None:
    """One held-out seed: the unbounded cache and every (policy, budget) of ``a``, one row each into ``rows``."""
    g = model.geometry
    clip = make_clip(seed, total)
    lat = encode(clip.frames)
    ref = rollout(model, lat, a.prefix, a.frames, make_policy("unbounded"), None, seed, a.page_size)
    ref_att, ref_preds = rollout(model, lat, a.prefix, a.frames, make_policy("unbounded"), None, seed,
                                 a.page_size, tap=True, teacher=lat, predict_every=a.predict_every)
    returning = M.returning_pairs(clip.visible)
    base = {"seed": seed, "prefix": a.prefix, "frames": a.frames}

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
                   attention_error_per_layer=att,
                   **_teacher_forced(preds, lat, clip, returning, g.frames_per_block))
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


def _memory_probe(model, a, total, pool, t0) -> list[dict]:
    """The memory-probe section of ``main``: held-out (or ``--probe-on-training-seeds``) seeds at the probe budgets."""
    g = model.geometry
    if a.probe_on_training_seeds:
        probe_seeds = [TRAIN_SEEDS[20_000 + 613 * i] for i in range(a.probe_seeds)]
    else:
        probe_seeds = [EVAL_SEED_BASE + 1000 + i for i in range(a.probe_seeds)]
    probe_budgets = sorted({to_budget(f, total, g.frames_per_block) for f in a.probe_fractions})
    probe = memory_probe(model, probe_seeds, probe_budgets, a.policies, a.probe_history, a.probe_min_gap,
                         a.page_size, pool=pool)
    print(f"memory probe done ({time.perf_counter() - t0:.0f}s)", flush=True)
    return probe


def _print_probe(a, probe, out) -> None:
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


def main(argv=None):
    a = _parser().parse_args(argv)
    from model_adapters import registry

    model = registry.load(a.model, "world-tiny")
    g = model.geometry
    if a.quick:
        _quick(a)
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
        _score_seed(model, a, seed, total, budgets, rows)
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
        out["summary"] = summarise(rows)
        path.write_text(json.dumps(out, indent=1))  # a long run that dies still leaves its finished seeds
    with worker_pool(a.model, a.workers if (a.rollout_seeds or a.probe_seeds) else 1) as pool:
        if a.rollout_seeds:
            free_rollouts(model, a, out, path, pool)
            print(f"free rollouts done ({time.perf_counter() - t0:.0f}s)", flush=True)
        probe = _memory_probe(model, a, total, pool, t0) if a.probe_seeds else []
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
        _print_probe(a, probe, out)
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
