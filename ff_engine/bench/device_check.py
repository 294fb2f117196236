"""The GPU check in one command, for a CUDA machine with nothing installed beyond PyTorch + Triton.

    python benchmarks/device_check.py --out benchmarks/results/device_check_<card>.json
    python benchmarks/device_check.py --dry-run --out /tmp/device_check.json      # the CPU rehearsal (CI)

Stages, each in its own process with its own time limit (a hang or a CUDA fault in one cannot take the others
down, and the whole run stays within ``--budget-s``, default 420 s = 7 minutes):
  0. the card and the software (printed first, and recorded);
  1. tests: the CUDA and Triton tests of ``tests/test_attention.py``, ``test_flex.py``, ``test_kernels.py``
     (``-k "cuda or triton"``: FlexAttention compiled, the Triton kernels at small and real sizes);
  2. kernels: ``benchmarks/kernel_bench.py`` (``ff-engine bench kernels``) -- paged vs contiguous FlexAttention,
     biased vs unbiased, scoring throughput as a share of the card's bandwidth;
  3. features (``device_features``, at most 2 minutes): the embedded world model v4 on the device, a fork that
     shares pages and steers elsewhere, a rollback regenerated, the NaN-neighbour isolation call on ``flex``;
  4. throughput: the engine at full Wan-1.3B geometry (30 layers, dim 1536, 12 x 128 heads, 480 x 832 =
     1560 tokens per latent frame, random bf16 weights, ``flex`` attention): one stream and ``--streams``
     streams under a 21-frame budget against unbounded streams in the same page pool (``stage_throughput``), and
     each experiment's block time as a multiple of the arithmetic lower bound (``ff_engine.limits``).
Everything lands in one JSON with the device name, written after every stage (a cut-short run keeps what it has).

What a bare machine lacks, and what this command does about it:
  * vLLM: its ``BlockPool`` cannot be imported there, so the stages run with ``FF_ENGINE_BLOCK_POOL=fallback``
    (``ff_engine/cache/fallback_block_pool.py``; recorded as ``block_pool``).  With vLLM installed, vLLM's pool runs.
  * pytest: if it is not importable, ``--stage-pytest DIR`` (run where pytest is installed) copies pytest and its
    pure-Python dependencies into ``DIR`` (about 15 MiB; default ``.device_carry/site``), which is carried along and
    put on ``PYTHONPATH``.  Without either, the tests stage is recorded as not run.
  * The model and the KV cache live on the GPU; the engine's noise, latents and schedule stay on the CPU
    (``OnDevice`` moves each forward's input there and its output back: 1.2 MB per stream per forward).
``--dry-run`` runs the same stages at toy sizes on whatever device there is (CPU: eager FlexAttention, Triton's
interpreter), so the one GPU call cannot fail on a typo.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ff_engine.bench import REPO  # the device check runs the tests of the checkout it belongs to
from ff_engine.bench.device_features import limit_fractions, run_features

CARRY_SITE = REPO / ".device_carry" / "site"
TEST_FILES = ["tests/test_attention.py", "tests/test_flex.py", "tests/test_kernels.py"]
PYTEST_PACKAGES = ["pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py.py", "exceptiongroup",
                   "tomli"]
STAGES = ("tests", "kernels", "throughput", "features")


# ---- environment ----------------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "host": platform.node(), "cpu_count": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_GiB=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count)
    else:
        env["device"] = "cpu"
    try:
        from vllm.v1.core.block_pool import BlockPool  # noqa: F401 - what PagePool imports
        env["vllm"] = True
    except ImportError:
        env["vllm"] = False
    env["block_pool"] = "vllm" if env["vllm"] else "fallback"
    env["pytest"] = "installed" if importlib.util.find_spec("pytest") else (
        "carried" if (CARRY_SITE / "pytest").is_dir() else None)
    return env


def stage_pytest(dest: Path) -> int:
    """Copy pytest and its pure-Python dependencies from this interpreter into ``dest`` (for carrying)."""
    import pytest

    site = Path(pytest.__file__).resolve().parents[1]
    dest.mkdir(parents=True, exist_ok=True)
    for name in PYTEST_PACKAGES:
        src = site / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"copied pytest into {dest} ({size / 2**20:.1f} MiB)")
    return 0


def child_env(env: dict) -> dict:
    """Environment of the stage processes: the repo (and a carried pytest) importable, vLLM's pool or the fallback."""
    out = dict(os.environ)
    paths = [str(REPO)] + ([str(CARRY_SITE)] if env["pytest"] == "carried" else [])
    out["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [out.get("PYTHONPATH")] if p])
    if not env["vllm"]:
        out["FF_ENGINE_BLOCK_POOL"] = "fallback"
    out["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no third-party plugins needed; a bare machine has none anyway
    return out


def run_process(cmd: list[str], timeout: float, env: dict) -> dict:
    """Run one stage process; rc, wall seconds, whether it timed out, the tail of its output."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, timeout),
                           check=False)
        rc, out, timed_out = p.returncode, p.stdout + p.stderr, False
    except subprocess.TimeoutExpired as exc:
        rc, timed_out = None, True
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    return {"cmd": " ".join(cmd), "rc": rc, "timed_out": timed_out, "wall_s": round(time.perf_counter() - t0, 1),
            "output_tail": out[-3000:]}


# ---- stages ---------------------------------------------------------------------------------------------
def run_tests(env: dict, timeout: float, dry_run: bool) -> dict:
    """The CUDA and Triton tests (a dry run only collects and skips the CUDA ones: CI runs the Triton ones)."""
    if env["pytest"] is None:
        return {"run": False, "why": "pytest is not importable and was not carried (see --stage-pytest)"}
    select = "cuda" if dry_run else "cuda or triton"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select, *TEST_FILES]
    r = run_process(cmd, timeout, child_env(env))
    lines = [ln for ln in r["output_tail"].splitlines() if ln.strip()]
    r["summary"] = lines[-1] if lines else ""
    r["passed"] = r["rc"] == 0
    return r


def run_json_stage(cmd: list[str], env: dict, timeout: float, out: Path) -> dict:
    r = run_process([*cmd, "--out", str(out)], timeout, child_env(env))
    if out.is_file():
        r["result"] = json.loads(out.read_text())
    return r


class OnDevice:
    """An adapter whose weights live on ``device``: each forward's input goes there, the flow comes back to the
    engine's CPU side; everything else (geometry, RoPE tables, config) is the wrapped model's."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __getattr__(self, name):
        return getattr(self.model, name)

    def parameters(self):
        return self.model.parameters()

    def encode_prompt(self, text):
        return self.model.encode_prompt(text.to(self.device))

    def forward(self, latents, timesteps, prompts, start_frames, attention, **inputs):
        """``inputs``: what an adapter declares beyond the common five (actions, conditioning, stream state),
        its tensors moved to the device as the latents are."""
        import torch
        from torch.utils._pytree import tree_map

        inputs = tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, inputs)
        flow = self.model.forward(latents.to(self.device), timesteps.to(self.device), prompts, start_frames, attention,
                                  **inputs)
        return flow.cpu()


def _model(tiny: bool, device):
    import torch

    from model_adapters import registry

    cfg = registry.get_preset("wan-tiny").with_(num_layers=1) if tiny else registry.get_preset("wan-1.3b")
    torch.manual_seed(0)
    model = registry.build(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return OnDevice(model.to(device, dtype), device), cfg


def _run_streams(model, device, page_size, num_pages, cfgs, max_batch) -> dict:
    """Run ``cfgs`` through one scheduler; per-step latency, aggregate latent frames/s, errors."""
    import torch

    from ff_engine.engine import Engine
    from ff_engine.engine.scheduler import Scheduler

    engine = Engine(model, num_pages=num_pages, page_size=page_size, backend="flex", device=str(device))
    sched = Scheduler(engine, max_batch=max_batch)
    for c in cfgs:
        sched.submit(c)
    lat, errors, step_frames = [], [], []
    t0 = time.perf_counter()
    while not sched.idle:
        ts = time.perf_counter()
        results = sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        lat.append(time.perf_counter() - ts)
        errors += [r.error for r in results if r.error]
        step_frames.append(sum(r.latents.shape[0] for r in results if not r.error))
    wall = time.perf_counter() - t0
    out = {"streams": len(cfgs), "wall_s": wall, "latent_frames": sum(step_frames),
           "frames_per_s": sum(step_frames) / wall, "step_latency_s": lat, "errors": errors[:3],
           "failed": len(errors), "backend_fallbacks": getattr(engine.backend, "fallbacks", 0)}
    if len(lat) > 3:  # without the first two steps, which compile the kernels for the new shapes
        out["steady_frames_per_s"] = sum(step_frames[2:]) / sum(lat[2:])
    del sched, engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def this_device():
    """``(device, name)``: the first CUDA device and its card's name, else the CPU."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _throughput_record(a, model, cfg, device, frames, budget, t_start) -> dict:
    """The throughput stage's JSON before its experiments: device, model geometry, sizes, setup time."""
    g = model.geometry
    return {"device": this_device()[1], "tiny": a.tiny,
            "model": {"layers": cfg.num_layers, "dim": cfg.dim, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
                      "latent_hw": list(cfg.latent_hw), "tokens_per_frame": g.tokens_per_frame,
                      "frames_per_block": g.frames_per_block, "dtype": str(next(model.parameters()).dtype)},
            "frames": frames, "budget_frames": budget, "page_size": a.page_size,
            "setup_s": time.perf_counter() - t_start, "experiments": {}}


def _pool_pages(a, device, g, streams, unbounded_pages) -> int:
    """The pool: what the card holds after the weights, minus a working margin (no card: ``streams`` unbounded
    streams of ``unbounded_pages`` each)."""
    import torch

    from ff_engine.memory import kv_page_bytes

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        bytes_per_page = kv_page_bytes(a.page_size, g.num_kv_heads, g.head_dim, 2)  # bf16
        return int(free * a.kv_share) // bytes_per_page
    return streams * unbounded_pages


def _run_plan(a, model, device, pool, plan, session, out, path, t_start) -> None:
    """Each ``(name, policy, budget, streams)`` of ``plan`` into ``out["experiments"]``, the JSON rewritten after
    each; past ``--deadline-s`` the rest are skipped, one that fails is recorded and the next one runs."""
    for name, policy, b, n in plan:
        if time.perf_counter() - t_start > a.deadline_s:
            out["experiments"][name] = {"skipped": "time budget"}
            continue
        try:
            cfgs = [session(policy, b, seed) for seed in range(n)]
            r = _run_streams(model, device, a.page_size, pool, cfgs, max_batch=n)
        except Exception as exc:  # noqa: BLE001 - recorded, the next experiment runs
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out["experiments"][name] = {"policy": policy, "budget_frames": b, **r}
        print(json.dumps({"experiment": name, **{k: v for k, v in r.items() if k != "step_latency_s"}},
                         default=str), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=str))


def _throughput_ratios(out) -> None:
    """Bounded over unbounded aggregate frames/s, and each single stream's last block over its second."""
    ex = out["experiments"]
    fps = {k: v.get("steady_frames_per_s", v.get("frames_per_s")) for k, v in ex.items()}
    if fps.get("window_batch") and fps.get("unbounded_batch"):
        out["bounded_over_unbounded_aggregate"] = fps["window_batch"] / fps["unbounded_batch"]
    for key in ("window_1", "unbounded_1"):
        lat = ex.get(key, {}).get("step_latency_s")
        if lat and len(lat) >= 3:
            out[f"{key}_last_over_second_block"] = lat[-1] / lat[1]


def stage_throughput(a) -> int:
    """The engine at full Wan-1.3B geometry (``--tiny``: wan-tiny on this device).  Experiments in order, the JSON
    rewritten after each one; one that fails is recorded and the next one runs."""
    import torch

    from ff_engine.engine import SessionConfig
    from ff_engine.engine.engine import reservation_pages
    from ff_engine.policies import make_policy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    model, cfg = _model(a.tiny, device)
    g = model.geometry
    # tiny: 3 blocks under a 1-block budget, so the second and third writes evict
    frames, budget, streams = (9, 3, min(a.streams, 2)) if a.tiny else (a.frames, a.budget_frames, a.streams)
    out = _throughput_record(a, model, cfg, device, frames, budget, t_start)
    path = Path(a.out)

    def prompt(seed):
        return torch.randn(16, cfg.text_dim, generator=torch.Generator().manual_seed(seed))

    def session(policy, b, seed):
        return SessionConfig(prompt=prompt(seed), num_frames=frames, seed=seed, policy=make_policy(policy),
                             budget_frames=b)

    def pages(c):
        return reservation_pages(g, a.page_size, c)

    unbounded_pages = pages(session("unbounded", None, 0))
    pool = _pool_pages(a, device, g, streams, unbounded_pages)
    n_unbounded = max(1, min(streams, pool // unbounded_pages))
    n_bounded = max(1, min(streams, pool // pages(session("window", budget, 0))))
    out.update(pool_pages=pool, streams_unbounded=n_unbounded, streams_bounded=n_bounded)
    plan = [
        ("window_1", "window", budget, 1),
        ("unbounded_1", "unbounded", None, 1),
        ("window_batch", "window", budget, n_bounded),
        ("unbounded_batch", "unbounded", None, n_unbounded),
        ("future-forcing_1", "future-forcing", budget, 1),
    ]
    _run_plan(a, model, device, pool, plan, session, out, path, t_start)
    _throughput_ratios(out)
    out["limit_fractions"] = limit_fractions(out, model, cfg, out["device"], a.page_size)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")
    return 0


def stage_features(a) -> int:
    """Fork, rollback and isolation on the device (``device_features``); the JSON written once at the end."""
    device, name = this_device()
    out = {"device": name, "checks": run_features(device, frames=9 if a.tiny else 18)}
    Path(a.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, default=str), flush=True)
    return 0


# ---- the command ----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/device_check_<card>.json)")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on this machine (the CI rehearsal)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole check")
    ap.add_argument("--skip", nargs="*", choices=STAGES, default=[])
    ap.add_argument("--stage-pytest", metavar="DIR", nargs="?", const=str(CARRY_SITE), default=None,
                    help="copy pytest into DIR for carrying to a bare machine, then exit")
    # the throughput stage (run as its own process by the command above)
    ap.add_argument("--stage", choices=["throughput", "features"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, default=1e9, help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=36, help="latent frames per stream in the throughput stage")
    ap.add_argument("--budget-frames", type=int, default=21)
    ap.add_argument("--streams", type=int, default=4, help="most streams in one batch")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--kv-share", type=float, default=0.6, help="share of free GPU memory given to the page pool")
    return ap


def _run_stages(a, env, result, left, save) -> None:
    """The stages not in ``--skip``, each into ``result["stages"]`` and saved as it ends; ``left()`` is the time
    still in ``--budget-s``."""
    tiny = ["--tiny"] if a.dry_run else []
    with tempfile.TemporaryDirectory() as tmp:
        if "tests" not in a.skip:
            result["stages"]["tests"] = run_tests(env, min(150.0, left() * 0.35), a.dry_run)
            print(f"tests: {result['stages']['tests'].get('summary', result['stages']['tests'].get('why'))}",
                  flush=True)
            save()
        if "kernels" not in a.skip:
            r = run_json_stage([sys.executable, "benchmarks/kernel_bench.py", *tiny], env, min(180.0, left() * 0.5),
                               Path(tmp) / "kernels.json")
            result["stages"]["kernels"] = r
            print(f"kernels: rc {r['rc']} in {r['wall_s']} s", flush=True)
            save()
        if "features" not in a.skip:
            cmd = [sys.executable, "benchmarks/device_check.py", "--stage", "features", *tiny]
            r = run_json_stage(cmd, env, min(120.0, left() * 0.3), Path(tmp) / "features.json")
            result["stages"]["features"] = r
            print(f"features: rc {r['rc']} in {r['wall_s']} s", flush=True)
            save()
        if "throughput" not in a.skip:
            limit = left() - 5.0
            cmd = [sys.executable, "benchmarks/device_check.py", "--stage", "throughput", *tiny,
                   "--deadline-s", str(max(0.0, limit - 60.0)), "--frames", str(a.frames),
                   "--budget-frames", str(a.budget_frames), "--streams", str(a.streams), "--page-size",
                   str(a.page_size), "--kv-share", str(a.kv_share)]
            r = run_json_stage(cmd, env, limit, Path(tmp) / "throughput.json")
            result["stages"]["throughput"] = r
            print(f"throughput: rc {r['rc']} in {r['wall_s']} s", flush=True)
            save()


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.stage_pytest:
        return stage_pytest(Path(a.stage_pytest))
    if a.stage is not None and a.out is None:
        ap.error(f"--stage {a.stage} needs --out")
    if a.stage == "throughput":
        return stage_throughput(a)
    if a.stage == "features":
        return stage_features(a)

    t0 = time.perf_counter()
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  cuda {env['cuda']}  triton {env['triton']}  "
          f"block pool: {env['block_pool']}  pytest: {env['pytest']}", flush=True)
    if env["device"] == "cpu" and not a.dry_run:
        print("no CUDA device: use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    out = Path(a.out or REPO / "benchmarks" / "results" / f"device_check_{env['device'].replace(' ', '_')}.json")
    result = {"benchmark": "device_check", "device": env["device"], "dry_run": a.dry_run, "env": env, "stages": {}}

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t0)

    def save():
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    _run_stages(a, env, result, left, save)
    save()
    print(f"wrote {out} ({result['wall_s']} s)")
    ok = all(s.get("rc") == 0 for s in result["stages"].values() if "rc" in s)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
