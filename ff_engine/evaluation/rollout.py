"""One rollout of the world model under a cache policy: free after a ground-truth prefix, or teacher-forced.

The building block of every quality measurement; an ``AttentionTap`` (an engine observer) records each attention
call's output so the attention-output error of a policy can be compared with the unbounded cache's on the same
inputs.
"""

from __future__ import annotations

import statistics

import torch

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.engine import reservation_pages
from ff_engine.engine.observer import AttentionTap


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


def layer_errors(outputs, ref_outputs, num_layers):
    errs = [[] for _ in range(num_layers)]
    for i, (a, b) in enumerate(zip(outputs, ref_outputs)):
        errs[i % num_layers].append(float((a - b).norm() / b.norm().clamp_min(1e-12)))
    return [statistics.mean(e) for e in errs]
