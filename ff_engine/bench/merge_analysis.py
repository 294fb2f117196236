"""``ff-engine bench merge_analysis``: what Future Forcing's merge does to the scroll world's cache.

Free rollouts of ``future-forcing`` with the log-mass merge (its default until session 17) on *training* worlds of world model v4 (``--seed-set
training`` of ``bench scroll_quality``: decisions are made here, never on held-out worlds), one per (world,
script), with every merge decision recorded.  For each merged pair (victim -> partner) it reports:

  * the frame gap and the spatial offset (token rows / columns) between the two;
  * whether they show the **same world content**: the scroll world's camera position per frame is known, so a
    token's world column is ``camera[frame] + 4 px x column`` (mod the panorama); a pair of the same row whose
    world columns differ by less than half a token is the same content seen twice — the redundancy a merge is
    meant to remove; anything else is two different things averaged into one;
  * key distance (in the proxy's merge space) and value distance, relative to the partners' spreads (the
    tolerances ``merge_key_tol`` / ``merge_value_tol`` bound these);
  * whether they *look* alike: pixel MSE between the patches the two tokens show (the prefix's truth, then the
    generated frames), below ``LOOK_ALIKE`` — two patches of flat sky are redundant wherever they are — against
    chance (the same victims paired with random tokens of the same frame span);
  * the importance percentile of victim and partner among the ranked candidates.

    ff-engine bench merge_analysis [--seeds 4] [--budget 6] [--frames 240]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ff_engine.bench import RESULTS_DIR
from ff_engine.policies.merge import Merge, merge_into_partners, rms_spread, space_coords

RECORDS: list[dict] = []  # the running rollout's merge decisions (module level: the engine deep-copies policies)
TOKEN_PX = 4  # world v4: a token is 4 pixel columns wide (patch 2 latent columns x VAE stride 2)
LOOK_ALIKE = 0.005  # patch MSE under which two tokens show the same thing (pixels in [0, 1]; flat sky ~ 0)


class RecordingMerge(Merge):
    """``Merge`` that appends every merge decision to ``RECORDS`` (same decisions: it only observes)."""

    def remove(self, ctx, ranking):
        _, imp = ranking.removable()
        self._pct = torch.argsort(torch.argsort(imp)).float() / max(1, imp.numel() - 1)  # importance percentile
        self._layer = ctx.layer
        return super().remove(ctx, ranking)

    def merge(self, ctx, tokens, victims, survivors):
        k, v = tokens.k, tokens.v
        space = self.space(ctx, k.shape[1])
        assign, merged = merge_into_partners(k, v, tokens.log_mass, victims, survivors, space, self.mode,
                                             self.key_tol, self.value_tol)
        ok = assign >= 0
        if ok.any():  # the distances merge_into_partners compared with its tolerances, per merged pair
            coords = space_coords(k, space)
            kspread, vspread = rms_spread(coords[survivors]), rms_spread(v[survivors].float().flatten(1))
            a, b = victims[ok], assign[ok]
            pos = tokens.positions
            for i, j in zip(a.tolist(), b.tolist()):
                RECORDS.append({
                    "layer": self._layer, "victim": pos[i].tolist(), "partner": pos[j].tolist(),
                    "key_dist": float((coords[i] - coords[j]).norm() / kspread),
                    "value_dist": float((v[i].float().flatten() - v[j].float().flatten()).norm() / vspread),
                    "victim_pct": float(self._pct[i]), "partner_pct": float(self._pct[j]),
                    "victim_log_mass": float(tokens.log_mass[i]), "partner_log_mass": float(tokens.log_mass[j])})
        return assign, merged


def recording_future_forcing(**params):
    """``future-forcing`` with the log-mass merge (its default until session 17) whose merge step records its
    decisions."""
    from ff_engine.policies import make_policy

    ff = make_policy("future-forcing", **{"merge": "log-mass", **params})
    m = ff.inner.inner  # FutureForcing = BudgetSplit(Merge(scorer))
    assert isinstance(m, Merge), type(m)
    ff.inner.inner = RecordingMerge(m.inner, m.mode, m.key_tol, m.value_tol, m.partners)
    return ff


def same_content(rec: dict, camera: torch.Tensor, panorama_w: int) -> bool:
    (f1, h1, w1), (f2, h2, w2) = rec["victim"], rec["partner"]
    x1, x2 = int(camera[f1]) + TOKEN_PX * w1, int(camera[f2]) + TOKEN_PX * w2
    d = abs(x1 - x2) % panorama_w
    return h1 == h2 and min(d, panorama_w - d) < TOKEN_PX / 2


def patch_mse(shown: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixel MSE between the patches tokens ``a`` and ``b`` ([n, 3] frame, row, column) show in ``shown`` [F, 3, H, W]
    (the prefix's truth, then the generated frames): 0 for two tokens that look the same, whatever their place."""
    ph, pw = shown.shape[2] // 4, shown.shape[3] // 12  # world v4: a 4 x 12 token grid

    def patches(p):
        rows = (p[:, 1, None] * ph + torch.arange(ph))[:, :, None]
        cols = (p[:, 2, None] * pw + torch.arange(pw))[:, None, :]
        return shown[p[:, 0, None, None], :, rows, cols]  # [n, ph, pw, 3]

    return (patches(a) - patches(b)).pow(2).mean((1, 2, 3))


def analyse(records: list[dict], camera, panorama_w: int, shown: torch.Tensor) -> dict:
    if not records:
        return {"merges": 0}
    same = [same_content(r, camera, panorama_w) for r in records]
    a = torch.tensor([r["victim"] for r in records])
    b = torch.tensor([r["partner"] for r in records])
    look = patch_mse(shown, a, b)
    g = torch.Generator().manual_seed(0)  # chance level: the same victims against random tokens of the cache span
    rand = torch.stack([torch.randint(int(a[:, 0].min()), int(a[:, 0].max()) + 1, (len(a),), generator=g),
                        torch.randint(0, 4, (len(a),), generator=g), torch.randint(0, 12, (len(a),), generator=g)], 1)
    chance = patch_mse(shown, a, rand)
    gaps = [r["victim"][0] - r["partner"][0] for r in records]

    def med(key, sel=None):
        xs = [r[key] for r, s in zip(records, same) if sel is None or s == sel]
        return statistics.median(xs) if xs else None

    return {"merges": len(records), "same_content_share": sum(same) / len(same),
            "look_alike_share": float((look < LOOK_ALIKE).float().mean()),
            "look_alike_share_chance": float((chance < LOOK_ALIKE).float().mean()),
            "patch_mse_median": float(look.median()), "patch_mse_median_chance": float(chance.median()),
            "same_position_share": sum(r["victim"][1:] == r["partner"][1:] for r in records) / len(records),
            "frame_gap_median": statistics.median(abs(g) for g in gaps),
            "key_dist_median": {"same": med("key_dist", True), "different": med("key_dist", False)},
            "value_dist_median": {"same": med("value_dist", True), "different": med("value_dist", False)},
            "victim_pct_median": med("victim_pct"), "partner_pct_median": med("partner_pct")}


def main(argv=None) -> int:
    from ff_engine.evaluation import scroll as ES
    from model_adapters import registry
    from model_adapters.world import EMBEDDED_V4, scroll

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(EMBEDDED_V4))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--budget", type=int, default=6)
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--out", default=str(RESULTS_DIR / "merge_analysis.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = registry.load(a.model, "world-v4")
    runs = []
    for i in range(a.seeds):
        for script in ES.SCRIPTS:
            job = ES.Job(ES.TRAINING_SEED_BASE + i, script, "ff-log-mass", a.budget, a.frames, scroll.PREFIX_FRAMES)
            RECORDS.clear()
            clip = ES.job_clip(job)
            px, _ = ES.rollout(model, job, clip, policy=recording_future_forcing())
            shown = torch.cat([clip.frames[:job.prefix].float(), px.float()])
            row = {"seed": job.seed, "script": script,
                   **analyse(list(RECORDS), clip.camera, scroll.PANORAMA_W, shown)}
            runs.append(row)
            print(row, flush=True)
    keys = ("same_content_share", "look_alike_share", "look_alike_share_chance", "patch_mse_median",
            "patch_mse_median_chance", "same_position_share", "frame_gap_median")
    out = {"command": "ff-engine bench merge_analysis " + " ".join(argv or []), "model": a.model,
           "budget": a.budget, "runs": runs,
           "mean": {k: statistics.mean(r[k] for r in runs if r.get("merges")) for k in keys}}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(out["mean"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
