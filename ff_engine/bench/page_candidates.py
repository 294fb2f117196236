"""How well do page summaries stand in for scoring every token?  Candidate recall and regret of Future Forcing.

With ``page_candidates=True`` Future Forcing ranks pages from their summaries and scores tokens exactly only in
the lowest-ranked pages.  At every compression of a teacher-forced run this measures, for each page ranking
(``centroid``, ``bound``) and oversampling factor:

* recall: the share of the tokens exact scoring would remove that the candidate path also removes;
* regret: the importance (exact scores) of what the candidate path removes over that of what exact scoring
  removes (1 = as good as exact).

Two models: the trained world model (ground-truth world clips of training seeds fed block by block, budget 30
frames, page 16) and the random-weight golden-trace model (its own rollout, budget 21 frames, page 8).  The
cache evolves under the default exact scoring in both, so every ranking is asked about the same caches.

    python benchmarks/page_candidates.py           # ~4 min on 2 cores
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import REPO, RESULTS_DIR
from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.engine import reservation_pages
from ff_engine.policies import FutureForcing
from model_adapters import registry
from model_adapters.world.procedural import TRAIN_SEEDS, encode, make_clip

ROOT = REPO
RESULTS = RESULTS_DIR
WORLD_MODEL = ROOT / "model_adapters" / "world" / "assets" / "world_model.safetensors"
GOLDEN = ROOT / "tests" / "fixtures" / "self_forcing_reference"
VARIANTS = [("centroid", 2.0), ("centroid", 3.0), ("bound", 2.0), ("bound", 3.0)]


def measure(engine, session, teacher=None):
    """Run the session to its end (teacher-forced when ``teacher`` latents are given) and return
    {(rank, oversample): (mean recall, mean regret, compressions)} over every compression that removes tokens."""
    pol = session.policy
    acc = {v: ([], []) for v in VARIANTS}
    inner = pol.compress

    def spy(ctx):
        if ctx.num_tokens > ctx.budget_tokens and pol.proxy.has(ctx.layer):
            for rank, over in VARIANTS:
                pol.page_rank, pol.candidate_oversample = rank, over
                pol.scorer.forget_page_importance()  # pages cache their rank per proxy version only
                acc[(rank, over)][0].append(pol.candidate_recall(ctx))
                acc[(rank, over)][1].append(pol.candidate_regret(ctx))
            pol.page_rank, pol.candidate_oversample = "centroid", 2.0
        inner(ctx)

    pol.compress = spy
    fpb = engine.geometry.frames_per_block
    if teacher is None:
        while session.id in engine.sessions:
            engine.step([session.id])
    else:
        while session.block < session.num_blocks - 1:
            if err := engine.commit_block([session], teacher[session.start_frame:session.start_frame + fpb][None],
                                          record=False):
                raise RuntimeError(f"teacher-forced block failed: {err}")
        engine.cancel(session.id)
    return {v: (sum(r) / len(r), sum(g) / len(g), len(r)) for v, (r, g) in acc.items()}


def main(argv=None):
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int_arg(1), default=2, help="world-model training seeds")
    ap.add_argument("--frames", type=int_arg(1), default=96)
    ap.add_argument("--out", default=str(RESULTS / "page_candidates.json"))
    a = ap.parse_args(argv)
    rows = []
    world = registry.load(WORLD_MODEL, "world-tiny")
    g = world.geometry
    per_seed = []
    for i in range(a.seeds):
        seed = TRAIN_SEEDS[20_000 + 613 * i]
        lat = encode(make_clip(seed, a.frames).frames)
        cfg = SessionConfig(prompt=torch.zeros(1, world.cfg.text_dim), num_frames=a.frames, seed=seed,
                            policy=FutureForcing(), budget_frames=30)
        e = Engine(world, num_pages=reservation_pages(g, 16, cfg), page_size=16, backend="torch")
        s = e.add_session(cfg)
        e.prefill(s.id, lat[:g.frames_per_block])
        per_seed.append(measure(e, s, teacher=lat))
    for v in VARIANTS:
        n = sum(p[v][2] for p in per_seed)
        rows.append({"model": "world (trained)", "page_rank": v[0], "oversample": v[1], "compressions": n,
                     "recall": sum(p[v][0] * p[v][2] for p in per_seed) / n,
                     "regret": sum(p[v][1] * p[v][2] for p in per_seed) / n})
    golden = registry.load(GOLDEN / "model.safetensors", "wan-tiny")
    prompt = torch.load(GOLDEN / "text_context.pt", weights_only=True)["prompt_embeds"][0]
    e = Engine(golden, num_pages=3000, page_size=8, backend="torch")
    s = e.add_session(SessionConfig(prompt=prompt, num_frames=48, policy=FutureForcing(), budget_frames=21))
    for v, (rec, reg, n) in measure(e, s).items():
        rows.append({"model": "golden (random weights)", "page_rank": v[0], "oversample": v[1], "compressions": n,
                     "recall": rec, "regret": reg})
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "page_candidates", "rows": rows}, indent=1))
    print(f"{'model':26s} {'rank':>8s} {'over':>5s} {'recall':>7s} {'regret':>7s}")
    for r in rows:
        print(f"{r['model']:26s} {r['page_rank']:>8s} {r['oversample']:5.1f} {r['recall']:7.3f} {r['regret']:7.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
