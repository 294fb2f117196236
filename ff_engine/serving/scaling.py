"""How many engine replicas a ``ServeCluster`` wants: a Ray Serve autoscaling policy over pages, not requests.

Serve's default policy scales on requests in flight per replica; an engine replica always has exactly one (the
router's ``step``), so that signal says nothing.  What does: streams waiting for pages (scale up by as many
replicas as their pages need beyond what is free) and capacity nobody uses (scale down by one when the streams
left would fit on one replica fewer at ``low_water`` of its pages).  ``decide`` is the rule, a pure function (the
tests and ``bench simulate`` call it directly); ``engine_replicas_policy`` feeds it what the replicas report
(``EngineReplica.record_autoscaling_stats``: free pages, pages, streams, and the router's queue).
"""

from __future__ import annotations

import math


def decide(current: int, *, queued_pages: float, free_pages: float, used_pages: float, pages_per_replica: float,
           lo: int, hi: int, low_water: float = 0.5) -> int:
    """Target replicas.  Up: enough replicas for the queue's pages beyond those free now (at least one more while
    anything waits).  Down: one fewer when nothing waits and every used page would fit in ``current - 1``
    replicas at ``low_water`` of their pages.  Always within ``[lo, hi]``."""
    if current < lo:
        return lo
    if queued_pages > 0:
        short = max(0.0, queued_pages - free_pages)
        return min(hi, current + max(1, math.ceil(short / max(pages_per_replica, 1.0))))
    if current > lo and used_pages <= (current - 1) * pages_per_replica * low_water:
        return current - 1
    return min(current, hi)


def engine_replicas_policy(ctx):
    """Ray Serve custom autoscaling policy (``AutoscalingPolicy(policy_function=...)``)."""
    metrics = ctx.aggregated_metrics or {}
    per = {name: list((metrics.get(name) or {}).values()) for name in
           ("free_pages", "pages_total", "queued_pages", "streams")}
    if not per["pages_total"]:  # no report yet: keep what there is
        return ctx.current_num_replicas, ctx.policy_state
    total, free = sum(per["pages_total"]), sum(per["free_pages"])
    target = decide(
        ctx.current_num_replicas,
        queued_pages=max(per["queued_pages"] or [0.0]),  # every replica reports the same router queue
        free_pages=free,
        used_pages=total - free,
        pages_per_replica=total / len(per["pages_total"]),
        lo=ctx.capacity_adjusted_min_replicas,
        hi=ctx.capacity_adjusted_max_replicas,
    )
    return target, ctx.policy_state
