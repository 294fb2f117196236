"""Which worker a stream goes to: the rule the router places by, shared with ``bench simulate`` (which drives it
with simulated replicas), so a simulated cluster places exactly as a real one.

A worker here is anything with ``name``, ``alive``, ``draining``, ``free`` (pages not booked) and ``placed``
(stream -> pages).  Rules:
* ``most-free`` (the default, ``router.py`` says why): the fitting worker with the most free pages — spreads
  streams, keeps the largest holes for large requests;
* ``best-fit``: the fitting worker with the fewest free pages that still fit — packs streams, leaves whole
  workers empty (to scale down or to hold an unbounded request).
Ties: fewer streams, then name (deterministic).
"""

from __future__ import annotations

PLACEMENTS = ("most-free", "best-fit")


def best_worker(workers, pages: int, rule: str = "most-free", exclude=None):
    fits = [w for w in workers if w.alive and not w.draining and w is not exclude and w.free >= pages]
    sign = -1 if rule == "most-free" else 1
    return min(fits, key=lambda w: (sign * w.free, len(w.placed), w.name), default=None)


def queue_admits(waiting_new: int, max_queue: int | None, placeable_now: bool) -> bool:
    """Admission of a new stream: one that can be placed at once never waits; otherwise it joins the FIFO queue
    unless ``max_queue`` new streams already wait (streams re-queued after a worker death or parked streams
    resuming are not counted: the caller leaves them out of ``waiting_new``)."""
    return placeable_now or max_queue is None or waiting_new < max_queue
