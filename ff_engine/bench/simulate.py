"""``bench simulate``: a discrete-event simulation of a cluster of engine replicas, placing and admitting with the
router's own code (``ff_engine.serving.placement``: ``best_worker``, ``queue_admits``).

What is simulated: replicas with a page pool each, stepping their runnable streams in rounds of up to
``max_batch`` (a round's time from a block-time profile); a FIFO queue in front (nothing overtakes its head);
with ``migration-aware`` placement, a head that fits nowhere makes room by one move (``placement.make_room``):
the moved stream stops at once, its pages go to the target after a block time (the source's block boundary) and
it runs again a block time later — 2 block times in all, the low end of the 2-4 measured
(``benchmarks/results/migration.json``); one move at a time, as the router does;
streams that pause (interactive users) and, with parking, give their pages back after ``park_after`` seconds
and resume at the queue's front; the autoscaling rule ``scaling.decide`` when ``--autoscale`` is given.
Traffic: Poisson arrivals whose rate follows a diurnal cycle (one "day" per ``--day-s``) with bursts, heavy-tailed
stream lengths (log-normal in blocks), pauses with exponential lengths.  Deterministic for a seed.

Block-time profiles (``PROFILES``): ``cpu-world`` was measured on this repo's 2-core box (the embedded world model,
one torch thread: 0.265 s per stream-block at batch 1, ``benchmarks/results/migration.json``; batched rounds cost
batch x that, as a CPU gives no batching gain worth counting); ``h100-matrix-game-published`` is the Matrix-Game
2.0 authors' published ~25 frames/s at 352x640 on one H100 (one 3-latent-frame block = 12 frames: 0.48 s at batch
1) — a published figure, not measured here — with batch b assumed to cost 0.48 x (0.4 + 0.6 b) (an assumption,
labelled so in the output).

Reported per placement policy: admitted, rejected (queue full), time to first frame p50 / p99, pages in use vs
stranded (free while a stream waits: free pages no waiting stream can use), both averaged over the arrival window,
replica-hours (until the last stream ends: heavy-tailed lengths make a drain tail), parks, moves.

    ff-engine bench simulate [--replicas 1000] [--minutes 30] [--seed 0] [--profile h100-matrix-game-published]
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import RESULTS_DIR
from ff_engine.engine.scheduler import round_robin
from ff_engine.serving.placement import PLACEMENTS, best_worker, make_room, queue_admits
from ff_engine.serving.scaling import decide

PROFILES = {
    "cpu-world": {"block_s": 0.265, "batch_cost": (0.0, 1.0), "source": "measured here (migration.json)"},
    "h100-matrix-game-published": {"block_s": 0.48, "batch_cost": (0.4, 0.6),
                                   "source": "published (Matrix-Game 2.0 authors, ~25 fps on H100); batch cost "
                                             "assumed"},
}


@dataclass
class Stream:
    id: int
    arrival: float
    blocks: int
    pages: int
    pauses: list  # (after block, seconds)
    cost: float | list = 1.0  # one block's compute in units of the profile's block_s, or each block's (a trace's)
    done: int = 0
    first_block_at: float | None = None
    finished_at: float | None = None
    paused_until: float | None = None
    parked: bool = False
    moving: bool = False
    replica: str | None = None  # where it was last placed
    block_at: list = field(default_factory=list)

    def block_cost(self) -> float:
        """The cost of its next block (an unbounded cache's grow block by block)."""
        return self.cost[min(self.done, len(self.cost) - 1)] if isinstance(self.cost, list) else self.cost


@dataclass
class Replica:
    name: str
    pages_total: int
    alive: bool = True
    draining: bool = False
    placed: dict = field(default_factory=dict)
    busy: bool = False
    started: float = 0.0
    stopped: float | None = None
    cursor: int = 0

    @property
    def free(self) -> int:
        return self.pages_total - sum(self.placed.values())


class Simulation:
    def __init__(self, a, placement: str, park: bool, trace=None, profile: dict | None = None):
        """``trace``: (arrival s, blocks, pages[, cost]) per stream instead of generated traffic (cost: a block's, or a
        list of each block's, in units of the profile's block time); ``profile``: a block-time
        profile (as ``PROFILES``' entries) instead of ``a.profile`` (``simulate_check`` measures one)."""
        self.a, self.placement, self.park, self.trace = a, placement, park, trace
        self.rng = random.Random(a.seed)
        p = profile or PROFILES[a.profile]
        self.block_s, (self.c0, self.c1) = p["block_s"], p["batch_cost"]
        self.replicas = [Replica(f"r{i:04d}", a.pages) for i in range(a.replicas)]
        self.by_name = {r.name: r for r in self.replicas}
        self.dirty: set[str] = set()  # replicas that may have a round to start
        self.streams: dict[int, Stream] = {}
        self.queue: deque[int] = deque()
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.out = {"admitted": 0, "rejected": 0, "finished": 0, "parks": 0, "moves": 0, "ttff": [], "used": [],
                    "stranded": [], "admission_order": [], "rejections": []}
        self.making_room = False  # migration-aware: one move in flight for the queue's head
        self.next_room_try = 0.0  # after a search that found no move, the next one waits a block time

    # ---- events ---------------------------------------------------------------------------------
    def push(self, t, kind, *args):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, args))

    def traffic(self):
        """Arrivals for the whole run (thinning of a non-homogeneous Poisson process)."""
        a, t, peak = self.a, 0.0, self.a.rate * 1.5 * (1 + self.a.burst)
        while True:
            t += self.rng.expovariate(peak)
            if t >= a.minutes * 60:
                return
            rate = a.rate * (1 + 0.5 * math.sin(2 * math.pi * t / a.day_s))
            if int(t // a.burst_every_s) % 7 == 3:  # a burst window
                rate *= 1 + a.burst
            if self.rng.random() < rate / peak:
                blocks = max(1, min(a.max_blocks, int(self.rng.lognormvariate(math.log(a.median_blocks), 1.0))))
                pauses = []
                if self.rng.random() < a.p_interactive:
                    pauses = sorted((self.rng.randrange(blocks), self.rng.expovariate(1 / a.pause_s))
                                    for _ in range(self.rng.randint(1, 3)))
                self.push(t, "arrive", blocks, pauses)

    def run(self):
        if self.trace is None:
            self.traffic()
        for t, blocks, pages, *cost in self.trace or ():  # a given trace: (arrival s, blocks, pages[, cost])
            self.push(t, "arrive", blocks, [], pages, *cost)
        while self.events:
            self.now, _, kind, args = heapq.heappop(self.events)
            getattr(self, "on_" + kind)(*args)
            self.place()
            self.kick()
            self.sample()
        return self.report()

    def on_arrive(self, blocks, pauses, pages=None, cost=1.0):
        if pages is None:
            pages = self.a.large_pages if self.rng.random() < self.a.large_share else self.a.stream_pages
        s = Stream(len(self.streams), self.now, blocks, pages, pauses, cost)
        self.streams[s.id] = s
        placeable = not self.queue and best_worker(self.replicas, s.pages, self.placement) is not None
        waiting_new = sum(1 for sid in self.queue if not self.streams[sid].parked)
        if not queue_admits(waiting_new, self.a.max_queue, placeable):
            self.out["rejected"] += 1
            self.out["rejections"].append(s.id)
            return
        self.queue.append(s.id)

    def on_round(self, name, batch):
        r = self.by_name[name]
        r.busy = False
        self.dirty.add(name)
        for sid in batch:
            s = self.streams[sid]
            if sid not in r.placed:
                continue
            s.done += 1
            if self.trace is not None:  # a given trace is small: keep each block's time (``simulate_check``)
                s.block_at.append(self.now)
            if s.first_block_at is None:
                s.first_block_at = self.now
                self.out["ttff"].append(self.now - s.arrival)
            if s.done >= s.blocks:
                s.finished_at = self.now
                del r.placed[sid]
                self.out["finished"] += 1
            elif s.pauses and s.pauses[0][0] <= s.done:
                _, secs = s.pauses.pop(0)
                s.paused_until = self.now + secs
                self.push(s.paused_until, "unpause", sid)
                if self.park and secs > self.a.park_after:
                    self.push(self.now + self.a.park_after, "park", sid)

    def on_unpause(self, sid):
        s = self.streams[sid]
        s.paused_until = None
        self.dirty.update(r.name for r in self.replicas if sid in r.placed) if not s.parked else None
        if s.parked:
            self.queue.appendleft(sid)  # a resuming parked stream goes to the front

    def on_park(self, sid):
        s = self.streams[sid]
        if s.paused_until is None:
            return
        for r in self.replicas:
            if r.placed.pop(sid, None) is not None:
                s.parked = True
                self.out["parks"] += 1

    def on_scale(self):
        live = [r for r in self.replicas if r.alive]
        total = sum(r.pages_total for r in live)
        free = sum(r.free for r in live)
        queued = sum(self.streams[sid].pages for sid in self.queue)
        want = decide(len(live), len(live), queued_pages=queued, free_pages=free, used_pages=total - free,
                      pages_per_replica=self.a.pages, lo=self.a.autoscale[0], hi=self.a.autoscale[1])
        if want > len(live):
            for _ in range(want - len(live)):
                r = Replica(f"r{len(self.replicas):04d}", self.a.pages, started=self.now)
                self.replicas.append(r)
                self.by_name[r.name] = r
        elif want < len(live):  # an empty replica goes (one with streams would drain: not modelled)
            empty = [r for r in live if not r.placed and not r.busy]
            if empty:
                empty[-1].alive, empty[-1].stopped = False, self.now
        if self.events or self.queue:
            self.push(self.now + self.a.scale_every_s, "scale")

    def on_moved(self, sid, source, target):
        """A move for the head reaches the source's block boundary: the stream's pages go to the target (or to
        the best other replica when the target filled meanwhile; the move is dropped when none can take it)."""
        s, src, dst = self.streams[sid], self.by_name[source], self.by_name[target]
        self.making_room = False
        if sid not in src.placed:  # it ended meanwhile: room made anyway
            s.moving = False
            return
        dst = dst if dst.alive and dst.free >= s.pages else best_worker(self.replicas, s.pages, "best-fit", src)
        if dst is None:
            s.moving = False
            return
        dst.placed[sid] = src.placed.pop(sid)
        self.out["moves"] += 1
        self.push(self.now + self.block_s, "restored", sid, dst.name)

    def on_restored(self, sid, name):
        self.streams[sid].moving = False
        self.dirty.add(name)

    def try_make_room(self, pages):
        if self.placement != "migration-aware" or self.making_room or self.now < self.next_room_try:
            return
        plan = make_room(self.replicas, pages, lambda sid: not self.streams[sid].moving)
        if plan is None:  # searching again at every event of a saturated 1,000-replica cluster costs O(streams)
            self.next_room_try = self.now + self.block_s
            return
        sid, src, dst = plan
        self.streams[sid].moving = self.making_room = True
        self.push(self.now + self.block_s, "moved", sid, src.name, dst.name)

    # ---- the cluster --------------------------------------------------------------------------
    def place(self):
        while self.queue:
            s = self.streams[self.queue[0]]
            r = best_worker(self.replicas, s.pages, self.placement)
            if r is None:
                self.try_make_room(s.pages)
                break
            self.queue.popleft()
            r.placed[s.id], s.replica = s.pages, r.name
            self.dirty.add(r.name)
            if not s.parked:
                self.out["admitted"] += 1
                self.out["admission_order"].append(s.id)
            s.parked = False

    def sample(self):
        if len(self.out["used"]) and self.out["used"][-1][0] > self.now - self.a.sample_s:
            return
        live = [r for r in self.replicas if r.alive]
        free = sum(r.free for r in live)
        self.out["used"].append((self.now, sum(r.pages_total for r in live) - free, free if self.queue else 0))

    def kick(self):
        names, self.dirty = self.dirty, set()
        for r in (self.by_name[n] for n in sorted(names)):
            if not r.alive or r.busy:
                continue
            runnable = [sid for sid in r.placed if self.streams[sid].paused_until is None
                        and not self.streams[sid].moving]
            if not runnable:
                continue
            batch, r.cursor = round_robin(runnable, r.cursor, self.a.max_batch)  # the Scheduler's own rule
            r.busy = True
            units = sum(self.streams[sid].block_cost() for sid in batch)  # len(batch) unless a trace set costs
            cost = self.block_s * (self.c0 + self.c1 * units)
            self.push(self.now + cost, "round", r.name, batch)

    def report(self):
        o, end = self.out, self.now
        ttff = sorted(o["ttff"])
        pct = {f"ttff_p{q}_s": ttff[min(len(ttff) - 1, int(q / 100 * len(ttff)))] if ttff else None for q in (50, 99)}
        traffic_end = self.a.minutes * 60  # page use over the arrival window (the drain tail would dilute it)
        span = [(min(t1, traffic_end) - t0, u, st) for (t0, u, st), (t1, _, _) in zip(o["used"], o["used"][1:])
                if t0 < traffic_end]
        dur = sum(d for d, _, _ in span) or 1.0
        hours = sum(((r.stopped if r.stopped is not None else end) - r.started) for r in self.replicas) / 3600
        return {"placement": self.placement, "parking": self.park, "streams": len(self.streams),
                "admitted": o["admitted"], "rejected": o["rejected"], "finished": o["finished"], "parks": o["parks"],
                "moves": o["moves"],
                **pct, "pages_used_mean": sum(d * u for d, u, _ in span) / dur,
                "pages_stranded_mean": sum(d * st for d, _, st in span) / dur,
                "pages_total": self.a.pages * len([r for r in self.replicas if r.alive]),
                "replica_hours": hours, "simulated_s": end,
                "admission_order": o["admission_order"], "rejections": o["rejections"]}


def parser():
    ap = OneLineParser(prog="ff-engine bench simulate", description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int_arg(1), default=1000)
    ap.add_argument("--pages", type=int_arg(1), default=256, help="pages per replica")
    ap.add_argument("--stream-pages", type=int_arg(1), default=32, help="a stream's reservation")
    ap.add_argument("--large-share", type=float, default=0.2, help="streams with a large reservation (long "
                    "budgets, unbounded caches)")
    ap.add_argument("--large-pages", type=int_arg(1), default=96)
    ap.add_argument("--sample-s", type=float, default=1.0, help="page-use samples at most this often")
    ap.add_argument("--max-batch", type=int_arg(1), default=4)
    ap.add_argument("--max-queue", type=int_arg(0), default=2000)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=60.0, help="mean arrivals per second")
    ap.add_argument("--day-s", type=float, default=600.0, help="one diurnal cycle (compressed)")
    ap.add_argument("--burst", type=float, default=1.0, help="extra rate inside a burst window")
    ap.add_argument("--burst-every-s", type=float, default=30.0)
    ap.add_argument("--median-blocks", type=float, default=40.0)
    ap.add_argument("--max-blocks", type=int_arg(1), default=2000)
    ap.add_argument("--p-interactive", type=float, default=0.3)
    ap.add_argument("--pause-s", type=float, default=20.0)
    ap.add_argument("--park-after", type=float, default=5.0)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="h100-matrix-game-published")
    ap.add_argument("--autoscale", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    ap.add_argument("--scale-every-s", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR / "simulate.json"))
    return ap


def simulate(a, placement: str, park: bool) -> dict:
    sim = Simulation(a, placement, park)
    if a.autoscale:
        sim.push(0.0, "scale")
    return sim.run()


def plot(result: dict, png: str) -> None:
    """One bar group per measure (rejected share, TTFF p50 / p99, stranded pages share), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [f"{r['placement']}{' +park' if r['parking'] else ''}" for r in runs]
    measures = [("rejected, % of streams", lambda r: 100 * r["rejected"] / max(1, r["streams"])),
                ("TTFF p50, s", lambda r: r["ttff_p50_s"] or 0), ("TTFF p99, s", lambda r: r["ttff_p99_s"] or 0),
                ("stranded pages, % of pool", lambda r: 100 * r["pages_stranded_mean"] / r["pages_total"])]
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.4))
    for ax, (title, f) in zip(axes, measures):
        ax.bar(range(len(runs)), [f(r) for r in runs], color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    a = result["args"]
    fig.suptitle(f"bench simulate: {a['replicas']} replicas, {a['rate']:g} streams/s for {a['minutes']:g} min, "
                 f"profile {a['profile']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None):
    a = parser().parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # before the runs, not after twenty minutes of them
    runs = []
    for placement in PLACEMENTS:
        for park in (False, True):
            t0 = time.perf_counter()
            r = simulate(a, placement, park)
            r["wall_s"] = time.perf_counter() - t0
            runs.append(r)
            print(f"{placement:>9} parking {'on ' if park else 'off'}: {r['streams']} streams, admitted "
                  f"{r['admitted']}, rejected {r['rejected']}, ttff p50 {r['ttff_p50_s']:.2f} s p99 "
                  f"{r['ttff_p99_s']:.2f} s, pages used {r['pages_used_mean']:.0f} / {r['pages_total']}, stranded "
                  f"{r['pages_stranded_mean']:.0f}, {r['replica_hours']:.0f} replica-h ({r['wall_s']:.0f} s wall)")
    result = {"profile": {a.profile: PROFILES[a.profile]}, "args": {k: v for k, v in vars(a).items() if k != "out"},
              "runs": [{k: v for k, v in r.items() if k not in ("admission_order", "rejections")} for r in runs]}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, str(a.out).removesuffix(".json") + ".png")
    print(f"wrote {a.out} and its .png")
    return result


if __name__ == "__main__":
    main()
