"""Which worker a stream goes to: the rule the router places by, shared with ``bench simulate`` (which drives it
with simulated replicas), so a simulated cluster places exactly as a real one.

A worker here is anything with ``name``, ``alive``, ``draining``, ``free`` (pages not booked) and ``placed``
(stream -> pages).  Rules:
* ``most-free`` (the default, ``router.py`` says why): the fitting worker with the most free pages — spreads
  streams, keeps the largest holes for large requests;
* ``best-fit``: the fitting worker with the fewest free pages that still fit — packs streams, leaves whole
  workers empty (to scale down or to hold an unbounded request);
* ``migration-aware``: places as ``most-free``; when the queue's head fits on no worker but would after one
  running stream moved between two others, ``make_room`` names that move (the router migrates it, then places
  the head where it made room).  Free pages split across workers (fragmentation) then stop blocking a large
  request, at the price of one live migration (2-4 block times, ``benchmarks/results/migration.json``).
Ties: fewer streams, then name (deterministic).
"""

from __future__ import annotations

PLACEMENTS = ("most-free", "best-fit", "migration-aware")


def best_worker(workers, pages: int, rule: str = "most-free", exclude=None):
    fits = [w for w in workers if w.alive and not w.draining and w is not exclude and w.free >= pages]
    sign = 1 if rule == "best-fit" else -1
    return min(fits, key=lambda w: (sign * w.free, len(w.placed), w.name), default=None)


def queue_admits(waiting_new: int, max_queue: int | None, placeable_now: bool) -> bool:
    """Admission of a new stream: one that can be placed at once never waits; otherwise it joins the FIFO queue
    unless ``max_queue`` new streams already wait (streams re-queued after a worker death or parked streams
    resuming are not counted: the caller leaves them out of ``waiting_new``)."""
    return placeable_now or max_queue is None or waiting_new < max_queue


def make_room(workers, pages: int, movable=lambda stream: True):
    """The cheapest single move that lets a request of ``pages`` fit: ``(stream, source, target)`` such that after
    ``stream`` leaves ``source`` for ``target``, ``source`` has ``pages`` free; None when the request already fits
    somewhere or no single move makes room.  Cheapest = the fewest pages moved (a snapshot's size follows its
    pages), then the source closest to fitting, then names.  ``movable(stream)`` leaves out streams that cannot
    move now (already moving, parking, not started)."""
    live = [w for w in workers if w.alive and not w.draining]
    if any(w.free >= pages for w in live):
        return None
    best = None
    for src in live:
        if src.pages_total < pages:
            continue
        for sid, held in src.placed.items():
            if src.free + held < pages or not movable(sid):
                continue
            dst = best_worker([w for w in live if w is not src], held, "best-fit")
            if dst is None:
                continue
            key = (held, src.free + held - pages, src.name, str(sid))
            if best is None or key < best[0]:
                best = (key, (sid, src, dst))
    return None if best is None else best[1]
