"""``ff-engine analyze queries``: how much do query statistics drift across blocks, before and after RoPE?

Future Forcing rests on one observation: the canonical (pre-RoPE) query distribution of an AR video model is
stable over time while the RoPE-modulated one drifts with position.  This runs any adapter model through the
engine, records every block's cache-writing-pass queries per layer and head, and reports for each block b the
relative drift of the per-head mean from the first block's, ``|mu_b - mu_0| / |mu_0|``, and the cosine between
them, pre- and post-RoPE.  JSON + a plot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.observer import QueryMeans
from ff_engine.outputs import temporary_beside
from ff_engine.policies import Window


def drift(means: list[torch.Tensor]) -> dict[str, list[float]]:
    """Per block: relative L2 drift and cosine of each head's mean to block 0's, averaged over heads."""
    m = torch.stack(means)  # [B, H, D]
    ref = m[0:1]
    rel = ((m - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean(-1)
    cos = torch.nn.functional.cosine_similarity(m, ref.expand_as(m), dim=-1).mean(-1)
    return {"relative_drift": rel.tolist(), "cosine": cos.tolist()}


def analyze_queries(model, prompt: torch.Tensor, num_frames: int, budget_frames: int = 6, seed: int = 0,
                    page_size: int = 16, backend: str = "auto") -> dict:
    g = model.geometry
    engine = Engine(model, num_pages=g.num_layers * (-(-(budget_frames + g.frames_per_block) * g.tokens_per_frame // page_size)),
                    page_size=page_size, backend=backend)
    rec = engine.add_observer(QueryMeans())  # the queries of every cache-writing pass, under a rolling window
    s = engine.add_session(SessionConfig(prompt=prompt, num_frames=num_frames, seed=seed, policy=Window(),
                                         budget_frames=budget_frames))
    while s.id in engine.sessions:
        engine.step([s.id])
    layers = {}
    for layer in sorted(rec.pre):
        layers[layer] = {"pre_rope": drift(rec.pre[layer]), "post_rope": drift(rec.post[layer])}
    summary = {
        "pre_rope_final_drift": sum(v["pre_rope"]["relative_drift"][-1] for v in layers.values()) / len(layers),
        "post_rope_final_drift": sum(v["post_rope"]["relative_drift"][-1] for v in layers.values()) / len(layers),
    }
    return {"blocks": len(next(iter(rec.pre.values()))), "layers": layers, "summary": summary}


def plot_drift(result: dict, png: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for layer, v in result["layers"].items():
        ax[0].plot(v["pre_rope"]["relative_drift"], color="tab:blue", alpha=0.6, label="pre-RoPE" if layer == 0 else None)
        ax[0].plot(v["post_rope"]["relative_drift"], color="tab:red", alpha=0.6, label="post-RoPE" if layer == 0 else None)
        ax[1].plot(v["pre_rope"]["cosine"], color="tab:blue", alpha=0.6, label="pre-RoPE" if layer == 0 else None)
        ax[1].plot(v["post_rope"]["cosine"], color="tab:red", alpha=0.6, label="post-RoPE" if layer == 0 else None)
    ax[0].set(xlabel="block", ylabel="|mu_b - mu_0| / |mu_0| (mean over heads)", title="query-mean drift per layer")
    ax[1].set(xlabel="block", ylabel="cos(mu_b, mu_0)", title="query-mean direction per layer")
    for x in ax:
        x.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90, format="png")
    plt.close(fig)


def write(result: dict, out_dir: str | Path, title: str = "") -> Path:
    """``query_drift.json`` and ``query_drift.png`` in ``out_dir`` (created if missing): both are rendered under
    temporary names first and renamed only when both are complete, so a failure leaves neither half-written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = [out / "query_drift.json", out / "query_drift.png"]
    tmp = [temporary_beside(p) for p in final]
    try:
        tmp[0].write_text(json.dumps(result, indent=1, default=str))
        plot_drift(result, tmp[1], title)
        for t, p in zip(tmp, final):
            os.replace(t, p)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return final[0]
