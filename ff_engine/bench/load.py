"""Load test of ``ff-engine serve`` over loopback: concurrent REST and WebSocket streams with cancels, malformed
requests and overload bursts, against a real server subprocess on 127.0.0.1.  Bounded: it stops by itself after
``--duration`` seconds of load plus at most ``--drain`` seconds for the streams in flight, and kills the server.

Workload (seeded): ``--rest`` REST clients (submit, read the MJPEG stream, 1 in 5 cancels after its first block),
``--ws`` WebSocket clients (one session after another, 1 in 5 cancels), ``--interactive`` users steering the
action world model (after a block: steer, pause past ``--park-after`` so the stream is parked then steer to resume
it, fork over REST, roll back a block), one client sending malformed or hostile
requests every 0.25 s (bad JSON, NaN, unknown policy or parameter, wrong key, ``../`` ids, oversized bodies), and
one that bursts ``--burst`` long streams every 10 s to overload the queue (then cancels what it got), one sending
costly requests within every parameter's bound (each must be a 422 from the cost limit), and a slowloris client
holding ``--slowloris`` stalled request heads open (each must be closed by the server's header deadline).  Lengths
3..30 latent frames, policies window / sink-window / future-forcing.  The server: the embedded world model,
``--pages`` pages, queue bound ``--max-queue``, ``--max-records`` terminal streams remembered (what bounds its
memory: the service keeps the last blocks of each), one torch thread.

Reported (JSON + plot in benchmarks/results/): streams served (finished with every frame), cancelled, rejected
(429), errors (a 5xx, a dropped connection, a stream that failed or lost a frame, a malformed request not answered
4xx), p50 / p99 time to first frame and per-block latency (client side), pages still used once everything ended
(leaked; must be 0), parked / resumed / forked / rolled-back counts and the resume latency p50 / p99 (server), server RSS at start (after warm-up) and end.  Exit code 1 when errors or leaked pages are
not 0.

    python benchmarks/load.py                # >= 2 minutes of load (the README's figures)
    python benchmarks/load.py --quick        # CI: ~12 s of load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from ff_engine.bench import RESULTS_DIR
from ff_engine.client import AsyncClient, ServerError

RESULTS = RESULTS_DIR
KEY = "load-test-key"
# The slowloris client connects from its own loopback address, as an attacker would: the server's per-address
# connection cap then applies to it, not to the well-behaved clients on 127.0.0.1 (Linux routes all of 127/8 to lo).
ATTACKER_ADDRESS = "127.0.0.2"
HEADER_TIMEOUT = 2.0  # the server's --header-timeout in the load test (slowloris clients are closed by then)
POLICIES = [("window", {}), ("sink-window", {"sink_frames": 3}), ("future-forcing", {"horizon": 3})]
HOSTILE = [
    ("POST", "/v1/videos", b"{not json", {}),
    ("POST", "/v1/videos", b'{"seconds": NaN}', {}),
    ("POST", "/v1/videos", b'{"frames": -5}', {}),
    ("POST", "/v1/videos", b'{"frames": 99999999}', {}),
    ("POST", "/v1/videos", b'{"policy": "lru"}', {}),
    ("POST", "/v1/videos", b'{"policy": "future-forcing", "policy_params": {"evil": 1}}', {}),
    ("POST", "/v1/videos", b'{"policy": "future-forcing", "policy_params": {"horizon": 1e9}}', {}),
    ("POST", "/v1/videos", b'{"prompt": "../../etc/passwd"}', {}),
    ("POST", "/v1/videos", b'{"frames": 3, "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", {}),
    ("POST", "/v1/videos", b'{"prompt": "' + b"a" * 70000 + b'"}', {}),
    ("POST", "/v1/videos", b'{"frames": 3}', {"Authorization": "Bearer wrong"}),
    ("GET", "/v1/videos/vid_..%2F..%2Fetc%2Fpasswd", None, {}),
    ("GET", "/v1/videos/vid_1234/file", None, {}),
    ("DELETE", "/v1/videos/vid_" + "f" * 32, None, {}),
]


class Stats:
    def __init__(self):
        self.served = self.cancelled = self.rejected = self.errors = self.hostile = 0
        self.ttff: list[float] = []
        self.block_latency: list[float] = []
        self.error_samples: list[str] = []
        self.timeline: list[dict] = []
        self.costly = self.slowloris_closed = self.slowloris_refused = 0
        self.interactive = {"sessions": 0, "steers": 0, "paused_long": 0, "forks": 0, "rollbacks": 0}

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(what[:300])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, out_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "ff_engine.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-pages",
        str(args.pages),
        "--max-queue",
        str(args.max_queue),
        "--max-batch",
        "8",
        "--max-streams-per-key",
        "64",
        "--max-records",
        str(args.max_records),
        "--output-dir",
        out_dir,
        "--api-key",
        KEY,
        "--torch-threads",
        "1",
        "--backend",
        args.backend,
        "--log-level",
        "warning",
        "--park-after",
        str(args.park_after),
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--undo-blocks",
        "4",
    ]
    if args.interactive:  # the steerable world model (v4); the other clients' requests suit it as well
        from model_adapters.world import EMBEDDED_V4

        cmd += ["--model", str(EMBEDDED_V4)]
    log = open(Path(out_dir) / "server.log", "w")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start: {(Path(out_dir) / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)


def stream_request(rng: random.Random) -> dict:
    policy, params = rng.choice(POLICIES)
    return {
        "frames": 3 * rng.randint(1, 10),
        "seed": rng.randrange(1 << 30),
        "policy": policy,
        "policy_params": params,
        "budget_frames": 6,
    }


async def admitted(start, rng: random.Random, st: Stats, what: str, transport_what: str, transport_errors):
    """Await a stream's start; None after counting a 429 (and backing off for a random share of its Retry-After,
    at most 2 s) or an error."""
    try:
        return await start
    except ServerError as exc:
        if exc.status != 429:
            st.error(f"{what}: {exc}")
        else:
            st.rejected += 1
            await asyncio.sleep(min(exc.retry_after or 1.0, 2.0) * rng.random())
    except transport_errors as exc:
        st.error(f"{transport_what}: {type(exc).__name__}: {exc}")
    return None


async def rest_client(c: AsyncClient, rng: random.Random, stop: float, st: Stats) -> None:
    while time.monotonic() < stop:
        req, cancel = stream_request(rng), rng.random() < 0.2
        t0 = time.monotonic()
        v = await admitted(c.submit(**req), rng, st, "rest submit", "rest submit", httpx.HTTPError)
        if v is None:
            continue
        frames, last_block, t_last = 0, -1, t0
        try:
            async for headers, _ in c.frames(v["id"]):
                now, block = time.monotonic(), int(headers["X-Block"])
                if frames == 0:
                    st.ttff.append(now - t0)
                elif block != last_block:
                    st.block_latency.append(now - t_last)
                frames, last_block, t_last = frames + 1, block, now
                if cancel and block == 0 and frames == 3:
                    await c.cancel(v["id"])
            final = await c.wait(v["id"], timeout=120, file=False)
        except (ServerError, httpx.HTTPError, TimeoutError) as exc:
            st.error(f"rest stream {v['id']}: {type(exc).__name__}: {exc}")
            continue
        if final["status"] == "finished" and frames == req["frames"]:
            st.served += 1
        elif final["status"] == "cancelled" and cancel:
            st.cancelled += 1
        else:
            st.error(f"rest stream {v['id']}: {final['status']} with {frames}/{req['frames']} frames: {final['error']}")


async def ws_client(c: AsyncClient, rng: random.Random, stop: float, st: Stats) -> None:
    while time.monotonic() < stop:
        req, cancel = stream_request(rng), rng.random() < 0.2
        t0 = time.monotonic()
        rt = await admitted(c.realtime(**req), rng, st, "ws start", "ws connect", OSError)
        if rt is None:
            continue
        frames, t_last = 0, t0
        try:
            async with rt:
                async for block in rt:
                    now = time.monotonic()
                    (st.ttff if block.index == 0 else st.block_latency).append(now - t_last)
                    t_last, frames = now, frames + len(block.frames)
                    if cancel and block.index == 0:
                        await rt.cancel()
        except Exception as exc:  # noqa: BLE001 - any failure of the session is an error of the run
            st.error(f"ws session: {type(exc).__name__}: {exc}")
            continue
        state = rt.done["state"] if rt.done else "no session.done"
        if state == "finished" and frames == req["frames"]:
            st.served += 1
        elif state == "cancelled" and cancel:
            st.cancelled += 1
        else:
            st.error(f"ws session {rt.id}: {state} with {frames}/{req['frames']} frames")


async def interactive_client(c: AsyncClient, rng: random.Random, stop: float, st: Stats, park_s: float) -> None:
    """A user steering a world model over the WebSocket: after each block it may steer (random action), pause
    long enough to be parked then steer again (which resumes it; the wait to the next block is the resume
    latency), fork (REST; the fork is read to its end over REST) or roll back one block.  A session passes when
    it finishes with every block and every control answered by its applied receipt or a 4xx refusal."""
    while time.monotonic() < stop:
        req = {**stream_request(rng), "actions": ["stay"], "frames": 3 * rng.randint(6, 12)}
        rt = await admitted(c.realtime(**req), rng, st, "interactive start", "interactive connect", OSError)
        if rt is None:
            continue
        blocks, sent, forks = set(), 0, []
        try:
            async with rt:
                async for block in rt:
                    blocks.add(block.index)
                    if block.index == 0 or block.index >= req["frames"] // 3 - 3:  # leave time for the receipts
                        continue
                    sent += await _interact(c, rt, rng, st, park_s, forks)
            await asyncio.gather(*forks)
        except Exception as exc:  # noqa: BLE001 - any failure of the session is an error of the run
            st.error(f"interactive session: {type(exc).__name__}: {exc}")
            continue
        _check_interactive(rt, req, blocks, sent, st)


async def _interact(c, rt, rng: random.Random, st: Stats, park_s: float, forks: list) -> int:
    """One user move after a block; returns the controls sent over the WebSocket."""
    r = rng.random()
    if r < 0.15:  # think long enough to be parked, then steer: the steer resumes it
        await rt.send({"type": "session.update", "event_id": f"p{rng.randrange(1 << 30)}", "paused": True})
        await asyncio.sleep(park_s + 0.5)
        st.interactive["paused_long"] += 1
        await rt.send({"type": "session.update", "event_id": f"g{rng.randrange(1 << 30)}",
                       "actions": [rng.choice(["left", "right"])]})
        return 2
    if r < 0.25 and not forks:
        try:
            fork = await c.fork(rt.id)
            forks.append(asyncio.ensure_future(_read_fork(c, fork["id"], st)))
            st.interactive["forks"] += 1
        except ServerError as exc:
            if exc.status not in (409, 429):  # the stream ended, or no room for the fork: both are answers
                st.error(f"fork: {exc}")
        return 0
    if r < 0.35:
        await rt.send({"type": "session.rollback", "event_id": f"r{rng.randrange(1 << 30)}", "blocks": 1})
        st.interactive["rollbacks"] += 1
        return 1
    if r < 0.7:
        await rt.send({"type": "session.update", "event_id": f"s{rng.randrange(1 << 30)}",
                       "actions": [rng.choice(["left", "right", "stay"])]})
        st.interactive["steers"] += 1
        return 1
    return 0


async def _read_fork(c, vid: str, st: Stats) -> None:
    try:
        final = await c.wait(vid, timeout=120, file=False)
    except (ServerError, httpx.HTTPError, TimeoutError) as exc:
        st.error(f"fork {vid}: {type(exc).__name__}: {exc}")
        return
    if final["status"] != "finished" or final["blocks_done"] != final["num_blocks"]:
        st.error(f"fork {vid}: {final['status']} at {final['blocks_done']}/{final['num_blocks']}: {final['error']}")


def _check_interactive(rt, req: dict, blocks: set, sent: int, st: Stats) -> None:
    state = rt.done["state"] if rt.done else "no session.done"
    answered = sum(e["type"] in ("session.updated", "session.rolled_back") or e["type"] == "error"
                   and 400 <= e.get("status", 0) < 500 and "event" in e for e in rt.events)
    received = sum(e["type"] == "control.received" for e in rt.events)
    need = req["frames"] // 3
    if state == "finished" and blocks == set(range(need)) and received == sent and answered == sent:
        st.served += 1
        st.interactive["sessions"] += 1
    else:
        st.error(f"interactive {rt.id}: {state}, blocks {len(blocks)}/{need}, controls sent {sent}, received "
                 f"{received}, answered {answered}")


async def hostile_client(url: str, rng: random.Random, stop: float, st: Stats) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while time.monotonic() < stop:
            method, path, body, headers = rng.choice(HOSTILE)
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
            try:
                r = await http.request(method, path, content=body, headers=headers)
                ok = 400 <= r.status_code < 500 and "error" in r.json()
            except (httpx.HTTPError, ValueError) as exc:
                ok, r = False, exc
            st.hostile += 1
            if not ok:
                st.error(f"hostile {method} {path[:40]}: {r}")
            await asyncio.sleep(0.25)


COSTLY = [  # within every parameter's bound, over the server's per-block / per-request cost limit: a 422 each
    {"frames": 30, "policy": "future-forcing", "policy_params": {"form": "exact", "samples": 1024, "horizon": 64}},
    {"frames": 30, "policy": "expected-attention", "policy_params": {"n_future_positions": 65536}},
    {"frames": 30, "policy": "h2o", "policy_params": {"num_queries": 65536}},
    {"seconds": 600, "policy": "future-forcing", "policy_params": {"form": "exact", "samples": 64, "horizon": 16}},
]


async def cost_client(c: AsyncClient, rng: random.Random, stop: float, st: Stats) -> None:
    """Cost amplification: requests whose every field is in range but whose policy work is not; each must be a
    422 naming the field that sets the cost (nothing queued), never a slow stream."""
    while time.monotonic() < stop:
        req = rng.choice(COSTLY)
        try:
            v = await c.submit(**req)
            st.error(f"costly request accepted: {req} -> {v['id']}")
            await c.cancel(v["id"])
        except ServerError as exc:
            st.costly += 1
            if exc.status != 422 or not exc.param:
                st.error(f"costly request: {exc.status} param {exc.param}: {exc}")
        except httpx.HTTPError as exc:
            st.error(f"costly request: {type(exc).__name__}: {exc}")
        await asyncio.sleep(0.5)


async def slowloris_client(port: int, stop: float, st: Stats, held: int, header_timeout: float) -> None:
    """Slowloris: ``held`` connections that send half a request head and stall, again and again; the server must
    close each within its header deadline (plus slack), however many are open (it also caps them per client)."""
    while time.monotonic() < stop:
        conns = []
        for _ in range(held):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER_ADDRESS, 0))
                w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                conns.append((r, w))
            except OSError:
                st.slowloris_refused += 1  # the per-client cap closed it at once: that is a defence too
        t0 = time.monotonic()
        for r, w in conns:
            try:
                await asyncio.wait_for(r.read(), header_timeout + 5.0)  # EOF: the server closed it
                st.slowloris_closed += 1
            except TimeoutError:
                st.error(f"slowloris: a stalled request head held open {time.monotonic() - t0:.1f} s")
            except OSError:
                st.slowloris_closed += 1
            finally:
                w.close()
        await asyncio.sleep(1.0)


async def burst_client(c: AsyncClient, rng: random.Random, stop: float, st: Stats, size: int) -> None:
    while time.monotonic() < stop:
        got = []
        for _ in range(size):
            try:
                got.append((await c.submit(frames=300, seed=rng.randrange(1 << 30)))["id"])
            except ServerError as exc:
                if exc.status == 429:
                    st.rejected += 1
                else:
                    st.error(f"burst: {exc}")
        await asyncio.sleep(1.0)
        for vid in got:
            try:
                await c.cancel(vid)
                st.cancelled += 1
            except (ServerError, httpx.HTTPError) as exc:
                st.error(f"burst cancel {vid}: {exc}")
        await asyncio.sleep(9.0)


async def sampler(c: AsyncClient, proc: psutil.Process, t_start: float, stop: float, st: Stats) -> None:
    while time.monotonic() < stop:
        m = parse_metrics(await c.metrics())
        st.timeline.append(
            {
                "t": time.monotonic() - t_start,
                "active": m.get("ff_engine_streams_active", 0),
                "queued": m.get("ff_engine_streams_queued", 0),
                "pages_used": m.get("pages_used", 0),
                "rss_mb": proc.memory_info().rss / 2**20,
                "rejected": st.rejected,
                "served": st.served,
            }
        )
        await asyncio.sleep(1.0)


def parse_metrics(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("ff_engine_pages_used{"):
            out["pages_used"] = out.get("pages_used", 0) + float(value)
        else:
            out[name] = float(value)
    return out


async def run(args, url: str, proc: psutil.Process) -> tuple[Stats, dict]:
    st, rng = Stats(), random.Random(args.seed)
    t_start = time.monotonic()
    stop = t_start + args.duration
    async with AsyncClient(url, api_key=KEY, timeout=120) as c:
        tasks = [rest_client(c, random.Random(rng.random()), stop, st) for _ in range(args.rest)]
        tasks += [ws_client(c, random.Random(rng.random()), stop, st) for _ in range(args.ws)]
        tasks += [interactive_client(c, random.Random(rng.random()), stop, st, args.park_after)
                  for _ in range(args.interactive)]
        tasks += [
            hostile_client(url, random.Random(rng.random()), stop, st),
            burst_client(c, random.Random(rng.random()), stop, st, args.burst),
            cost_client(c, random.Random(rng.random()), stop, st),
            slowloris_client(int(url.rsplit(":", 1)[1]), stop, st, args.slowloris, HEADER_TIMEOUT),
            sampler(c, proc, t_start, stop + args.drain, st),
        ]
        gathered = asyncio.gather(*tasks[:-1])
        sample = asyncio.ensure_future(tasks[-1])
        try:
            await asyncio.wait_for(gathered, args.duration + args.drain)
        except TimeoutError:
            st.error("drain: clients still busy after --drain seconds")
        load_s = time.monotonic() - t_start
        deadline = time.monotonic() + 15
        while (m := parse_metrics(await c.metrics())).get("pages_used", 0) or m.get("ff_engine_streams_active"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        sample.cancel()
    return st, {"load_s": load_s, "final_metrics": m}


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if xs else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["timeline"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    t = [p["t"] for p in tl]
    ax[0].plot(t, [p["active"] for p in tl], label="active")
    ax[0].plot(t, [p["queued"] for p in tl], label="queued")
    ax[0].plot(t, [p["rejected"] for p in tl], label="rejected (429, cumulative)")
    ax[0].set(xlabel="s", title="streams")
    ax[0].legend()
    ax[1].plot(t, [p["pages_used"] for p in tl], color="C3")
    ax[1].set(
        xlabel="s",
        ylabel="pages",
        title=f"KV pages used (of {result['config']['pages']}); leaked at end: {result['leaked_pages']}",
    )
    ax2 = ax[1].twinx()
    ax2.plot(t, [p["rss_mb"] for p in tl], color="C4", ls="--")
    ax2.set_ylabel("server RSS (MiB, dashed)")
    ax[2].hist([result["_ttff"], result["_block"]], bins=30, label=["time to first frame", "per-block latency"])
    ax[2].set(xlabel="s", title="latency (client side)")
    ax[2].legend()
    fig.suptitle(
        f"ff-engine serve load test: {result['served']} served, {result['rejected']} rejected (429), "
        f"{result['errors']} errors, {result['cancelled']} cancelled"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI mode: ~12 s of load, fewer clients")
    ap.add_argument("--duration", type=float, default=150.0, help="seconds of load (then the drain)")
    ap.add_argument("--drain", type=float, default=90.0, help="seconds allowed for streams in flight to end")
    ap.add_argument("--rest", type=int, default=4)
    ap.add_argument("--ws", type=int, default=4)
    ap.add_argument("--burst", type=int, default=24)
    ap.add_argument("--interactive", type=int, default=2,
                    help="WebSocket users steering the action world model (v4): steer, park, fork, roll back")
    ap.add_argument("--slowloris", type=int, default=16, help="stalled request heads held open at a time")
    ap.add_argument("--park-after", type=float, default=1.0, help="the server's --park-after (seconds)")
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--max-queue", type=int, default=6)
    ap.add_argument("--max-records", type=int, default=64, help="terminal streams the server remembers")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "load.json"))
    return ap


def _serve_and_load(args):
    """Start the server, run the load against it, stop it; ``(stats, extra, rss_start, rss_end, server_log)``."""
    with tempfile.TemporaryDirectory(prefix="ff-load-") as tmp:
        server, url = start_server(args, tmp)
        try:
            proc = psutil.Process(server.pid)
            rss_start = proc.memory_info().rss
            st, extra = asyncio.run(run(args, url, proc))
            rss_end = proc.memory_info().rss
            server_log = (Path(tmp) / "server.log").read_text()
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    return st, extra, rss_start, rss_end, server_log


def _result(args, st, extra, rss_start, rss_end, server_log) -> dict:
    m = extra["final_metrics"]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), server: 1 torch thread",
        "config": {
            k: getattr(args, k)
            for k in (
                "quick",
                "duration",
                "drain",
                "rest",
                "ws",
                "burst",
                "interactive",
                "park_after",
                "slowloris",
                "pages",
                "max_queue",
                "max_records",
                "backend",
                "seed",
            )
        },
        "load_s": round(extra["load_s"], 1),
        "served": st.served,
        "cancelled": st.cancelled,
        "rejected": st.rejected,
        "errors": st.errors,
        "error_samples": st.error_samples,
        "hostile_requests": st.hostile,
        "costly_refused": st.costly,
        "slowloris": {"closed_by_server": st.slowloris_closed, "refused": st.slowloris_refused,
                      "header_timeout_s": HEADER_TIMEOUT},
        "ttff_s": {"p50": pct(st.ttff, 50), "p99": pct(st.ttff, 99), "n": len(st.ttff)},
        "block_latency_s": {
            "p50": pct(st.block_latency, 50),
            "p99": pct(st.block_latency, 99),
            "n": len(st.block_latency),
        },
        "leaked_pages": int(m.get("pages_used", -1)),
        "interactive": {
            **st.interactive,
            "parked": int(m.get("ff_engine_parks_total", 0)),
            "resumed": int(m.get("ff_engine_unparks_total", 0)),
            "forked": int(m.get("ff_engine_forks_total", 0)),
            "rolled_back": int(m.get("ff_engine_rollbacks_total", 0)),
            "parked_at_end": int(m.get("ff_engine_streams_parked", -1)),
            "resume_p50_s": m.get("ff_engine_unpark_p50_seconds"),
            "resume_p99_s": m.get("ff_engine_unpark_p99_seconds"),
        },
        "active_at_end": int(m.get("ff_engine_streams_active", -1)),
        "server_rss_mb": {"start": round(rss_start / 2**20, 1), "end": round(rss_end / 2**20, 1)},
        "server_log_tail": [ln for ln in server_log.splitlines() if "Triton" not in ln][-30:] if st.errors else [],
        "timeline": st.timeline,
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.duration, args.drain, args.rest, args.ws, args.burst = 12.0, 45.0, 2, 2, 20
        args.interactive = min(args.interactive, 2)
        args.backend = "torch"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    st, extra, rss_start, rss_end, server_log = _serve_and_load(args)
    result = _result(args, st, extra, rss_start, rss_end, server_log)
    out.write_text(json.dumps(result, indent=1))
    result.update(_ttff=st.ttff, _block=st.block_latency)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("_") and k != "timeline"}, indent=1))
    return 0 if st.errors == 0 and result["leaked_pages"] == 0 and st.served > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
