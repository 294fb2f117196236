"""How many engine replicas a ``ServeCluster`` wants: a Ray Serve autoscaling policy over pages, not requests.

Serve's default policy scales on requests in flight per replica; an engine replica always has exactly one (the
router's ``step``), so that signal says nothing.  What does: streams waiting for pages (scale up by as many
replicas as their pages need beyond what is free) and capacity nobody uses (scale down by one when the streams
left would fit on one replica fewer at ``low_water`` of its pages).  ``decide`` is the rule, a pure function (the
tests and ``bench simulate`` call it directly); ``engine_replicas_policy`` feeds it what the replicas report
(``EngineReplica.record_autoscaling_stats``: free pages, pages, streams, and the router's queue).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("ray.serve")  # the controller's log, where Serve's own scaling decisions go


def decide(running: int, target: int, *, queued_pages: float, free_pages: float, used_pages: float,
           pages_per_replica: float, lo: int, hi: int, low_water: float = 0.5) -> int:
    """The next target replica count, from ``running`` replicas (reporting) and the current ``target`` (replicas
    still starting count as capacity on its way).  Up: as many more replicas as the queue's pages need beyond the
    free pages and those on their way.  Down: one fewer when nothing waits or starts and every used page would
    fit in ``running - 1`` replicas at ``low_water`` of their pages.  Always within ``[lo, hi]``."""
    ppr = max(pages_per_replica, 1.0)
    coming = max(0, target - running) * ppr
    if queued_pages > 0:
        short = queued_pages - free_pages - coming
        want = target + math.ceil(short / ppr) if short > 0 else target
    elif target == running and running > lo and used_pages <= (running - 1) * ppr * low_water:
        want = running - 1
    else:
        want = target
    return max(lo, min(hi, want))


def engine_replicas_policy(ctx):
    """Ray Serve custom autoscaling policy (``AutoscalingPolicy(policy_function=...)``)."""
    metrics = ctx.aggregated_metrics or {}
    per = {name: list((metrics.get(name) or {}).values()) for name in
           ("free_pages", "pages_total", "queued_pages", "streams")}
    if not per["pages_total"]:  # no report yet: keep the target
        return max(ctx.target_num_replicas, ctx.capacity_adjusted_min_replicas), ctx.policy_state
    total, free = sum(per["pages_total"]), sum(per["free_pages"])
    target = decide(
        len(per["pages_total"]),
        ctx.target_num_replicas,
        queued_pages=max(per["queued_pages"] or [0.0]),  # every replica reports the same router queue
        free_pages=free,
        used_pages=total - free,
        pages_per_replica=total / len(per["pages_total"]),
        lo=ctx.capacity_adjusted_min_replicas,
        hi=ctx.capacity_adjusted_max_replicas,
    )
    if target != ctx.target_num_replicas:
        log.info("ff-engine policy: %d -> %d replicas (per replica: %s)", ctx.target_num_replicas, target,
                 {k: v for k, v in per.items() if v})
    return target, ctx.policy_state
