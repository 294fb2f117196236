"""``ff-engine``: generate / bench.  Every bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ff_engine import models
from ff_engine.argtypes import OneLineParser, int_arg, positive_float
from ff_engine.errors import BudgetError, ConfigError, FFEngineError
from ff_engine.models import DEFAULT_MODEL


def requested_frames(args, geometry) -> int:
    """--frames as given, or --seconds in the model's latent frames.  No RoPE table limits a stream (adapters compute
    angles for any frame); the caps are int32 token positions (``MAX_STREAM_FRAMES``, checked in float arithmetic
    first, so 1e308 seconds is an error, not an OverflowError) and memory (``check_memory``: an unbounded stream
    reserves its whole length)."""
    from ff_engine.engine.engine import MAX_STREAM_FRAMES

    g = geometry
    longest = MAX_STREAM_FRAMES // g.frames_per_block * g.frames_per_block  # whole blocks of int32 positions
    if args.frames is not None:
        if args.frames <= 0:
            raise ConfigError(f"--frames must be > 0, got {args.frames}")
        if math.ceil(args.frames / g.frames_per_block) * g.frames_per_block > longest:
            raise ConfigError(f"--frames {args.frames} exceeds int32 token positions: at most {longest} latent frames")
        return args.frames
    if args.seconds * g.fps / g.vae_stride[0] > longest:
        raise ConfigError(f"--seconds {args.seconds:g} exceeds int32 token positions of {longest} latent frames: "
                          f"at most {longest * g.vae_stride[0] / g.fps:g} s")
    return g.latent_frames(args.seconds)


def resolve_model(args):
    """(config, state_dict or None) of --model without building it, through the model registry (any architecture):
    a preset's config, or a checkpoint of any supported layout read and checked (every defect of the file is one
    ``CheckpointError``); a checkpoint's recorded config wins over --preset.  The reference-setting overrides
    (--num-frame-per-block, --context-noise) apply to either."""
    return models.resolve_model(args.model, preset=getattr(args, "preset", None),
                                random_weights=getattr(args, "random_weights", False), lora=getattr(args, "lora", None),
                                frames_per_block=getattr(args, "num_frame_per_block", None),
                                context_noise=getattr(args, "context_noise", None))


def build_model(args, resolved=None):
    """The model of --model: random weights for a preset (seeded by --seed), or the checkpoint's."""
    cfg, sd = resolved or resolve_model(args)
    return models.build_model(cfg, sd, seed=args.seed)


def reference_flags(args) -> None:
    """Self-Forcing / LongLive names onto ff-engine's (``ff_engine.policies.reference``): --sink-size is
    --sink-frames (and turns the default rolling window into the sink window, the reference's own policy);
    --local-attn-size sets --budget-frames once the block size is known (``prepare``)."""
    from ff_engine.policies.reference import ReferenceSettings

    if args.sink_size is not None:
        if args.sink_frames is not None and args.sink_frames != args.sink_size:
            raise ConfigError(f"--sink-size {args.sink_size} and --sink-frames {args.sink_frames} disagree; give one")
        args.sink_frames = args.sink_size
        if args.sink_size and args.policy == "window":
            args.policy = "sink-window"
    if args.local_attn_size is not None:  # checked here for the flags alone, with the block size once it is known
        ReferenceSettings(args.local_attn_size, args.sink_size or 0, args.num_frame_per_block or 1,
                          args.context_noise or 0.0)


def reference_budget(args, policy, frames_per_block: int) -> None:
    """--local-attn-size L -> --budget-frames L - frames_per_block (exactly the reference's window)."""
    from ff_engine.policies.reference import ReferenceSettings

    if getattr(args, "local_attn_size", None) is None:
        return
    ref = ReferenceSettings(args.local_attn_size, args.sink_size or 0, frames_per_block, args.context_noise or 0.0)
    ref.policy(policy)  # global attention needs the unbounded policy and a window a bounded one: one line if not
    if ref.bounded:
        args.budget_frames = ref.budget_frames


_FF_FLAGS = {"ff_horizon": "horizon", "ff_form": "form", "ff_merge": "merge", "ff_decay": "decay",
             "ff_aggregation": "aggregation", "sink_frames": "sink_frames"}


def policy_args(args) -> dict:
    """--ff-* flags and repeated --policy-arg key=value, typed from the policy's declared parameters."""
    from ff_engine.policies import parse_policy_args

    raw = {}
    for flag, param in _FF_FLAGS.items():
        val = getattr(args, flag, None)
        if val is not None:
            raw[param] = str(val)
    for item in args.policy_arg or []:
        if "=" not in item:
            raise ConfigError(f"--policy-arg expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        raw[key.strip().replace("-", "_")] = val.strip()
    return parse_policy_args(args.policy, raw)


class RunFailed(RuntimeError):
    """A run that started on valid inputs and failed (exit code 1, not 2)."""


@dataclass
class Prepared:
    """Everything ``generate`` / ``analyze`` checked before any heavy work: the model's config (and checkpoint
    tensors), the length, prompt, attention backend and pool size, all within the model's limits and memory."""

    cfg: Any
    state_dict: dict | None
    frames: int
    budget_frames: int | None
    prompt: torch.Tensor
    backend: Any
    num_pages: int
    world: Any = None  # WorldRun: the prefix and actions of a world model (None for other models)

    @property
    def geometry(self):
        return self.cfg.geometry()


@dataclass
class WorldRun:
    """What an in-repo world model's run starts from: ``prefix`` ground-truth frames of the world with ``seed``
    (prefilled, not written to the video) and one action per frame of the whole stream (None without actions)."""

    prefix: int
    actions: list[int] | None
    prefix_latents: torch.Tensor | None
    seed: int
    world: str | None


def world_run(args, cfg, frames: int) -> WorldRun:
    """--prefix-frames and --actions checked against the model (one line each), the prefix rendered."""
    from ff_engine.actions import parse_actions
    from model_adapters.world import prefix as wp

    if not hasattr(args, "prefix_frames"):  # analyze: the model alone
        return WorldRun(0, None, None, args.seed, None)
    world, fpb = wp.world_of(cfg), cfg.geometry().frames_per_block
    p = args.prefix_frames if args.prefix_frames is not None else wp.default_prefix_frames(cfg)
    if p and world is None:
        raise ConfigError("--prefix-frames needs an in-repo world model (its world renders the prefix)")
    if p % fpb:
        raise ConfigError(f"--prefix-frames must be a multiple of the block ({fpb} latent frames), got {p}")
    names = tuple(getattr(cfg, "actions", ()) or ())
    if args.actions is not None and not names:
        raise ConfigError("--actions: this model takes no actions")
    actions = None
    if names:
        script = parse_actions(args.actions, names) if args.actions is not None else [0]
        total = p + math.ceil(frames / fpb) * fpb
        actions = (wp.prefix_actions(cfg, p) + script + [script[-1]] * total)[:total]
    seed = wp.world_seed(args.seed)
    latents = wp.truth(cfg, seed, p, actions) if p else None
    return WorldRun(p, actions, latents, seed, world)


def prepare(args, policy) -> Prepared:
    """Validate every model-dependent input of ``generate`` / ``analyze`` cheaply, in the order a user fixes
    them: model, length, budget, prompt, backend and page size, pool size, memory."""
    from ff_engine.attention import get_backend
    from ff_engine.engine.engine import MAX_STREAM_FRAMES, stream_pages

    cfg, sd = resolve_model(args)
    g = cfg.geometry()
    generated = requested_frames(args, g)
    world = world_run(args, cfg, generated)
    frames = generated + world.prefix  # the prefix is part of the stream, not of the video
    reference_budget(args, policy, g.frames_per_block)
    budget = args.budget_frames if policy.bounded else None
    if budget is not None and budget > MAX_STREAM_FRAMES:
        raise ConfigError(f"--budget-frames {budget} exceeds int32 token positions: at most {MAX_STREAM_FRAMES} "
                          f"latent frames (no stream can be longer)")
    policy.validate(budget, g.frames_per_block)
    prompt = models.load_prompt(cfg, args.prompt_embeds, seed=args.seed)
    need = stream_pages(g, args.page_size, frames, budget)
    num_pages = getattr(args, "num_pages", None) or need
    if num_pages < need:
        raise BudgetError(f"--num-pages {num_pages} is below this stream's reservation of {need} pages "
                          f"({'budget + one block' if budget is not None else 'its whole length'} per layer)")
    prep = Prepared(cfg, sd, frames, budget, prompt, None, num_pages, world)
    check_memory(args, prep, least_budget=policy.sink_frames)  # before importing vLLM
    prep.backend = get_backend(args.backend)
    prep.backend.validate(args.page_size, MODEL_DTYPE, g.head_dim)
    return prep


#: ``CausalWanModel`` keeps its weights, activations and KV cache in float32 (checkpoints are converted on load)
MODEL_DTYPE = torch.float32


def _largest(ok, lo: int, hi: int) -> int:
    """The largest x in [lo, hi] with ok(x), for ok true up to some point and false after it; lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def check_memory(args, prep: Prepared, least_budget: int) -> None:
    """Weights plus the page pool must fit in the host's usable memory (``ff_engine.memory``); otherwise one
    ``BudgetError`` saying how large the setting the user chose may be."""
    from ff_engine.engine.engine import stream_pages
    from ff_engine.memory import cache_page_bytes, format_bytes, kv_page_bytes, usable_bytes
    from model_adapters import registry

    g, ps, budget, frames = prep.geometry, args.page_size, prep.budget_frames, prep.frames
    elt = torch.empty((), dtype=MODEL_DTYPE).element_size()

    mirrored = args.backend in ("auto", "vllm-cpu")  # on CPU, "auto" is vLLM's CPU op where it is installed

    def page_bytes(page_size):  # vLLM's CPU op keeps a packed mirror: a second copy of every page's K/V
        mirror = kv_page_bytes(page_size, g.num_kv_heads, g.head_dim, elt) if mirrored else 0
        return cache_page_bytes(page_size, g.num_kv_heads, g.head_dim, MODEL_DTYPE) + mirror

    if prep.state_dict is not None:
        weights = sum(t.numel() for t in prep.state_dict.values()) * elt
    else:
        weights = registry.param_count(prep.cfg) * elt
    usable = usable_bytes("cpu")
    page = page_bytes(ps)
    need = weights + (prep.num_pages + 1) * page  # + vLLM's null page
    if need <= usable:
        return
    fit = max(0, (usable - weights) // page - 1)
    if getattr(args, "num_pages", None):
        hint = f"at most --num-pages {fit} fits"
    elif fit < g.num_layers:
        best = _largest(lambda p: weights + (g.num_layers + 1) * page_bytes(p) <= usable, 1, ps)
        hint = f"at most --page-size {best} fits" if best >= 1 else "the weights alone do not fit"
    elif budget is not None:
        best = _largest(lambda b: stream_pages(g, ps, frames, b) <= fit, 0, budget)
        hint = f"at most --budget-frames {best} fits" if best >= least_budget else "not even the smallest budget fits"
    else:
        fpb = g.frames_per_block
        best = _largest(lambda f: stream_pages(g, ps, f * fpb, None) <= fit, 1, math.ceil(frames / fpb)) * fpb
        hint = f"unbounded, at most --frames {best} fits (a bounded policy needs far less)"
    raise BudgetError(f"this stream needs {format_bytes(need)} ({prep.num_pages} pages of {ps} tokens, "
                      f"{format_bytes(page)} each, + {format_bytes(weights)} of weights) but the host has "
                      f"{format_bytes(usable)} usable: {hint}")


def load_conditioning(path) -> dict | None:
    """``--conditioning FILE``: a .pt / .safetensors dict of per-stream model inputs (Matrix-Game: ``keyboard_cond``
    [P, keys] and ``mouse_cond`` [P, 2] per pixel frame, ``cond_concat`` [F, 20, H, W]); the model checks them."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--conditioning: no file {str(path)!r}")
    try:
        if str(path).endswith(".safetensors"):
            import safetensors.torch

            cond = safetensors.torch.load_file(str(path))
        else:
            cond = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise ConfigError(f"--conditioning: cannot read {str(path)!r}: {type(exc).__name__}") from None
    if not isinstance(cond, dict) or not all(isinstance(v, torch.Tensor) for v in cond.values()):
        raise ConfigError("--conditioning: the file must hold a dict of tensors")
    return {k: (v[0] if v.dim() == 3 and k != "cond_concat" and v.shape[0] == 1 else v) for k, v in cond.items()}


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from ff_engine.engine import Engine, SessionConfig
    from ff_engine.policies import make_policy
    from ff_engine.video import Mp4Writer, check_output_file

    check_output_file(args.out, "--out")
    reference_flags(args)
    policy = make_policy(args.policy, **policy_args(args))
    prep = prepare(args, policy)
    g = prep.geometry
    decoder = models.make_decoder(prep.cfg, args.vae)  # a VAE folder is loaded and checked before any compute
    cfg = SessionConfig(prompt=prep.prompt, num_frames=prep.frames, seed=args.seed, policy=policy,
                        budget_frames=prep.budget_frames, actions=prep.world.actions,
                        conditioning=load_conditioning(getattr(args, "conditioning", None)))
    writer = Mp4Writer(args.out, fps=g.fps, what="--out")  # folder + temporary file: writability proven now
    try:
        model = build_model(args, (prep.cfg, prep.state_dict))
        # Size the pool for exactly this stream unless told otherwise: admission then proves the budget holds.
        engine = Engine(model, num_pages=prep.num_pages, page_size=args.page_size, backend=prep.backend)
        session = engine.add_session(cfg)
        if prep.world.prefix:
            engine.prefill(session.id, prep.world.prefix_latents)
        reserved = engine.cache.pool.reserved(session.id)
        t0, video_frames = time.perf_counter(), 0
        bar = tqdm(total=session.num_blocks - session.block, unit="block", desc=f"{policy.name}", disable=args.quiet)
        try:
            while session.id in engine.sessions:
                for r in engine.step([session.id]):
                    if r.error:
                        raise RunFailed(f"generation failed at block {r.block}: {r.error}")
                    held = engine.cache.pages_held(session.id) if session.id in engine.sessions else 0
                    if decoder.streaming:
                        px = decoder.decode(r.latents)
                        writer.write(px)
                        video_frames += len(px)
                    bar.update(1)
                    made = (session.block * g.frames_per_block) - prep.world.prefix
                    fps = g.video_frames(made) / (time.perf_counter() - t0)
                    bar.set_postfix(fps=f"{fps:.2f}", pages=f"{held}/{reserved}")
            if not decoder.streaming:
                px = decoder.decode(torch.cat(session.latents)[prep.world.prefix:])
                writer.write(px)
                video_frames = len(px)
        finally:
            bar.close()
            engine.cancel(session.id)
        writer.close()  # complete: the temporary file becomes --out
    except BaseException:
        writer.abort()  # failure or Ctrl-C: no partial video under --out, no folder this run created
        raise
    dt = time.perf_counter() - t0
    print(f"wrote {args.out}: {video_frames} frames ({prep.frames - prep.world.prefix} latent) in {dt:.1f}s, "
          f"policy {policy.name}, "
          f"budget {cfg.budget_frames} frames, {reserved} pages reserved x {engine.cache.bytes_per_page()} B")
    return 0


def compare_policies(args) -> list:
    """The policies of --compare (names from ``GET /v1/policies``, default parameters; --policy-arg does not apply)."""
    from ff_engine.policies import make_policy

    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    if not 2 <= len(names) <= 8 or len(set(names)) != len(names):
        raise ConfigError(f"--compare needs 2 to 8 distinct policy names, got {args.compare!r}")
    return [make_policy(n) for n in names]


def cmd_compare(args) -> int:
    """Every --compare policy on the same seed, prefix and actions, batched through one engine, into one MP4."""
    from ff_engine.engine import Engine, SessionConfig
    from ff_engine.video import Mp4Writer, check_output_file, side_by_side

    check_output_file(args.out, "--out")
    reference_flags(args)
    policies = compare_policies(args)
    preps = [prepare(args, p) for p in policies]
    prep = preps[0]
    decoder = models.make_decoder(prep.cfg, args.vae)
    writer = Mp4Writer(args.out, fps=prep.geometry.fps, what="--out")
    try:
        model = build_model(args, (prep.cfg, prep.state_dict))
        engine = Engine(model, num_pages=sum(p.num_pages for p in preps), page_size=args.page_size,
                        backend=prep.backend)
        sessions = [engine.add_session(SessionConfig(prompt=prep.prompt, num_frames=prep.frames, seed=args.seed,
                                                     policy=pol, budget_frames=pr.budget_frames,
                                                     actions=prep.world.actions)) for pol, pr in zip(policies, preps)]
        t0 = time.perf_counter()
        latents = _run_batched(engine, sessions, prep.world, args.quiet)
        tiles = [(_tile_label(pol, pr), (decoder if not decoder.streaming else models.make_decoder(prep.cfg, args.vae))
                  .decode(lat)) for pol, pr, lat in zip(policies, preps, latents)]  # streaming decoders keep state
        if prep.world.prefix:  # the truth is known after a prefix of the world (not for generation from noise)
            from model_adapters.world import prefix as wp

            truth = wp.truth(prep.cfg, prep.world.seed, prep.frames, prep.world.actions)[prep.world.prefix:]
            tiles.insert(0, ("truth", decoder.decode(truth)))
        writer.write(side_by_side(tiles))  # the decoders already make watchable sizes
        writer.close()
    except BaseException:
        writer.abort()
        raise
    print(f"wrote {args.out}: {len(tiles)} tiles ({', '.join(t for t, _ in tiles)}), "
          f"{prep.frames - prep.world.prefix} latent frames each, in {time.perf_counter() - t0:.1f}s")
    return 0


def _tile_label(policy, prep: Prepared) -> str:
    return policy.name if prep.budget_frames is None else f"{policy.name} {prep.budget_frames}f"


def _run_batched(engine, sessions, world: WorldRun, quiet: bool) -> list[torch.Tensor]:
    """Prefill every session, then step them together (one forward per denoising step for all) to the end; the
    generated latents of each (after the prefix)."""
    from tqdm import tqdm

    for s in sessions:
        if world.prefix:
            engine.prefill(s.id, world.prefix_latents)
    bar = tqdm(total=sessions[0].num_blocks - sessions[0].block, unit="block", desc="compare", disable=quiet)
    try:
        while any(s.id in engine.sessions for s in sessions):
            for r in engine.step([s.id for s in sessions]):
                if r.error:
                    raise RunFailed(f"{r.session_id}: generation failed at block {r.block}: {r.error}")
            bar.update(1)
    finally:
        bar.close()
        for s in sessions:
            engine.cancel(s.id)
    return [torch.cat(s.latents)[world.prefix:] for s in sessions]


def cmd_plan(args) -> int:
    import json

    from ff_engine.plan import parse_bytes, plan
    from model_adapters import registry

    cfg = registry.get_preset(args.preset)
    weights = 0 if args.no_weights else registry.param_count(cfg) * args.dtype_bytes
    if args.limits:
        return print_limits(args, cfg, weights)
    r = plan(cfg.geometry(), gpu_mem_bytes=parse_bytes(args.gpu_mem), budget_frames=args.budget_frames,
             seconds=args.seconds, page_size=args.page_size, dtype_bytes=args.dtype_bytes, weights_bytes=weights)
    r["weights_bytes"] = weights
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    gib = 2**30
    print(f"{args.preset}: {r['latent_frames']} latent frames ({args.seconds:g} s), {r['tokens_per_frame']} tokens/frame, "
          f"page {r['page_size']}, {args.dtype_bytes}-byte KV")
    print(f"  KV per stream: unbounded {r['unbounded_kv_bytes_per_stream'] / gib:.2f} GiB, "
          f"bounded ({args.budget_frames} frames + 1 block) {r['bounded_kv_bytes_per_stream'] / gib:.2f} GiB "
          f"({r['memory_ratio']:.1f}x less)")
    print(f"  {args.gpu_mem}: {r['kv_bytes_available'] / gib:.1f} GiB for KV after {weights / gib:.1f} GiB weights "
          f"and 10 % workspace -> streams per GPU: unbounded {r['unbounded_streams']}, bounded {r['bounded_streams']}")
    return 0


def parse_budgets(text: str) -> list[int | None]:
    """'6,12,21,unbounded' -> [6, 12, 21, None]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in ("unbounded", "none"):
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ConfigError(f"--budgets takes latent-frame counts and 'unbounded', comma-separated; got {part!r}")
    return out


def print_limits(args, cfg, weights: int) -> int:
    """``plan --limits``: the physical limit per block on each GPU (``ff_engine.limits``)."""
    import json

    from ff_engine.limits import gpu, limits
    from model_adapters import registry

    budgets = parse_budgets(args.budgets)
    flops = lambda n, ctx: registry.forward_flops(cfg, n, ctx)
    reports = [limits(cfg, cfg.geometry(), flops, gpu(name.strip()), budgets=budgets, seconds=args.seconds,
                      page_size=args.page_size, dtype_bytes=args.dtype_bytes, weight_bytes=weights)
               for name in args.gpu.split(",")]
    if args.json:
        print(json.dumps(reports, indent=1))
        return 0
    print(f"{args.preset}: physical limits per block -- arithmetic from data-sheet figures, not measurements")
    for r in reports:
        print(f"\n{r['gpu']} ({r['source']})")
        print(f"  {'budget':>10} {'TFLOP/blk':>10} {'KV GiB/blk':>11} {'min s/blk':>10} {'max fps':>8} {'bound by':>17}"
              f" {'rt streams':>11} (compute/bw/memory)")
        for row in r["rows"]:
            b = "unbounded" if row["budget_frames"] is None else f"{row['budget_frames']} fr"
            print(f"  {b:>10} {row['tflops_per_block']:10.1f} {row['kv_gib_read_per_block']:11.2f} "
                  f"{row['block_seconds_min']:10.3f} {row['fps_max']:8.1f} {row['bound_by']:>17} "
                  f"{row['real_time_streams_max']:11d} ({row['real_time_streams_compute']}/"
                  f"{row['real_time_streams_bandwidth']}/{row['memory_streams']})")
    print(f"\n  {args.seconds:g} s videos at {reports[0]['fps']} fps; 'unbounded' averages its cache over the video; "
          "docs/gpu.md says what is left out")
    return 0


def cmd_convert(args) -> int:
    """Any supported checkpoint layout -> one clean safetensors file in the model's own names, config inside."""
    from model_adapters import registry

    ckpt = registry.convert(args.input, args.output, args.preset, lora=args.lora, lora_scale=args.lora_scale)
    g = ckpt.config.geometry()
    print(f"wrote {args.output}: {ckpt.architecture.name}, {len(ckpt.state_dict)} tensors, "
          f"{ckpt.num_params / 1e6:.1f}M parameters, {g.num_layers} layers x {g.num_heads} heads x {g.head_dim}")
    for note in ckpt.notes or ["the keys were already clean"]:
        print(f"  {note}")
    return 0


def cmd_analyze(args) -> int:
    from ff_engine import analysis
    from ff_engine.outputs import OutputFolder, check_folder_target
    from ff_engine.policies import Window

    check_folder_target(args.out_dir, "--out-dir")
    prep = prepare(args, Window())  # analyze_queries runs a rolling window and records the queries
    g = prep.geometry
    if math.ceil(prep.frames / g.frames_per_block) < 2:
        raise ConfigError(f"analyze queries needs at least 2 blocks ({2 * g.frames_per_block} latent frames) to "
                          f"compare, got {prep.frames}")
    folder = OutputFolder(args.out_dir, "--out-dir")  # created and proven writable before the compute
    try:
        model = build_model(args, (prep.cfg, prep.state_dict))
        result = analysis.analyze_queries(model, prep.prompt, prep.frames, prep.budget_frames, args.seed,
                                          args.page_size, prep.backend)
        path = analysis.write(result, folder.path, f"{args.model}: query drift over {result['blocks']} blocks")
    except BaseException:
        folder.discard()
        raise
    sm = result["summary"]
    print(f"wrote {path} (+ .png): mean relative drift of the query mean at the last block: "
          f"pre-RoPE {sm['pre_rope_final_drift']:.3f}, post-RoPE {sm['post_rope_final_drift']:.3f}")
    return 0


def cmd_bench(args, rest) -> int:
    """Every benchmark is a module of the package with ``main(argv)``, so an installed ff-engine runs any of them.
    Some ``main``s return their result rather than an exit code: only an integer is taken as the exit code."""
    import importlib

    from ff_engine.bench import BENCHMARKS

    rc = importlib.import_module(f"ff_engine.bench.{BENCHMARKS[args.which]}").main(rest)
    return rc if isinstance(rc, int) else 0


_Parser = OneLineParser


def _model_args(seconds: float, page_size: int) -> argparse.ArgumentParser:
    """What generate and analyze share: model, prompt, length, engine (a fresh parser per command, so their
    defaults stay separate)."""
    from ff_engine.engine.engine import MAX_SEED
    from model_adapters import registry

    model_args = _Parser(add_help=False)
    model_args.add_argument("--model", default=DEFAULT_MODEL,
                            help="checkpoint path or preset name (with --random-weights)")
    model_args.add_argument("--preset", default=None, choices=registry.preset_names(),
                            help="geometry defaults for a checkpoint (num_heads, text_len, grid); default: the "
                                 "checkpoint's architecture's")
    model_args.add_argument("--lora", default=None, help="a separate PEFT LoRA file merged at load (LongLive)")
    model_args.add_argument("--random-weights", action="store_true", help="random weights for a preset (smoke runs)")
    model_args.add_argument("--prompt-embeds", default=None, help="[L, text_dim] tensor file (.pt / .safetensors)")
    length = model_args.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=positive_float, default=seconds)
    length.add_argument("--frames", type=int_arg(1), default=None, help="latent frames (instead of --seconds)")
    model_args.add_argument("--budget-frames", type=int_arg(0), default=6,
                            help="latent frames of past KV kept per layer")
    model_args.add_argument("--seed", type=int_arg(0, MAX_SEED), default=0)
    model_args.add_argument("--page-size", type=int_arg(1), default=page_size)
    model_args.add_argument("--backend", default="auto")
    ref = model_args.add_argument_group("reference settings (Self-Forcing / LongLive names; docs/reference_settings.md)")
    ref.add_argument("--local-attn-size", type=int_arg(-1), default=None,
                     help="frames a block attends, itself included (-1: global); sets --budget-frames")
    ref.add_argument("--sink-size", type=int_arg(0), default=None, help="first frames that never roll (--sink-frames)")
    ref.add_argument("--num-frame-per-block", type=int_arg(1, 64), default=None,
                     help="latent frames per block (the model's frames_per_block)")
    ref.add_argument("--context-noise", type=float, default=None,
                     help="timestep in [0, 1000] of the cache-writing pass")
    return model_args


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate one video to an MP4", parents=[_model_args(5.0, 32)])
    g.add_argument("--policy", default="window")
    g.add_argument("--sink-frames", type=int_arg(0), default=None)
    g.add_argument("--ff-horizon", type=int, default=None, help="future-forcing: future frames of the query proxy")
    g.add_argument("--ff-form", choices=["cheap", "moment", "exact"], default=None)
    g.add_argument("--ff-merge", choices=["none", "log-mass", "affine"], default=None)
    g.add_argument("--ff-decay", type=float, default=None)
    g.add_argument("--ff-aggregation", choices=["mean", "max"], default=None)
    g.add_argument("--policy-arg", action="append", metavar="KEY=VALUE", help="any policy parameter (repeatable)")
    g.add_argument("--vae", default=None, help="local diffusers AutoencoderKLWan folder (else a latent preview)")
    g.add_argument("--num-pages", type=int_arg(1), default=None,
                   help="pool size (default: exactly this stream's reservation)")
    g.add_argument("--actions", default=None, metavar="SCRIPT|FILE", help="an action-conditioned model's actions "
                   "after the prefix: NAME:FRAMES,... (e.g. right:120,stay:24,left:96; the last one is held)")
    g.add_argument("--conditioning", default=None, metavar="FILE", help="per-stream model inputs (.pt / "
                   ".safetensors dict): Matrix-Game's keyboard_cond [P, keys] and mouse_cond [P, 2] per pixel frame, "
                   "cond_concat [F, 20, H, W]")
    g.add_argument("--prefix-frames", type=int_arg(0), default=None, help="world models: ground-truth frames of the "
                   "world (seed 1,000,000 + --seed, held out from training) prefilled before generating (default: "
                   "the whole panorama for world v4, none for v3)")
    g.add_argument("--compare", default=None, metavar="POLICY,...", help="generate under each policy (same seed, "
                   "prefix and actions) into one side-by-side MP4 of labelled tiles, with the truth for a world model")
    g.add_argument("--out", default="out/video.mp4", help="the MP4 (written under a temporary name until complete)")
    g.add_argument("--quiet", action="store_true")


def _add_plan(sub, registry) -> None:
    pl = sub.add_parser("plan", help="KV bytes and streams per GPU, bounded vs unbounded")
    pl.add_argument("--preset", default="wan-1.3b", choices=registry.preset_names())
    pl.add_argument("--gpu-mem", default="80GiB")
    pl.add_argument("--budget-frames", type=int_arg(1), default=21)
    pl.add_argument("--seconds", type=positive_float, default=60.0)
    pl.add_argument("--page-size", type=int_arg(1), default=32)
    pl.add_argument("--dtype-bytes", type=int, default=2, choices=[1, 2, 4])
    pl.add_argument("--no-weights", action="store_true", help="do not subtract the model weights")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--limits", action="store_true", help="the physical limit per block (FLOPs, KV bytes, "
                    "roofline time, fps and real-time streams per GPU): arithmetic from data-sheet figures")
    pl.add_argument("--gpu", default="H100,H200", help="GPUs for --limits (data-sheet figures): H100, H200")
    pl.add_argument("--budgets", default="6,12,21,unbounded", help="cache budgets (latent frames) for --limits")


def _add_convert(sub, registry) -> None:
    cv = sub.add_parser("convert", help="write any supported checkpoint layout as one clean safetensors file")
    cv.add_argument("input", help="checkpoint file or diffusers folder (Self-Forcing, CausVid, LongLive, Wan, "
                                  "SkyReels-V2...)")
    cv.add_argument("output", help="the .safetensors file to write")
    cv.add_argument("--preset", default=None, choices=registry.preset_names(),
                    help="what the tensors cannot tell (heads, text length, grid); default: the architecture's")
    cv.add_argument("--lora", default=None, help="a separate PEFT LoRA file to merge (LongLive's lora.pt)")
    cv.add_argument("--lora-scale", type=float, default=1.0, help="lora_alpha / rank (LongLive: 256 / 256 = 1)")


def make_parser() -> argparse.ArgumentParser:
    from model_adapters import registry

    ap = _Parser(prog="ff-engine", description="Long AR video generation under a bounded paged KV cache")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_generate(sub)
    from ff_engine.bench import BENCHMARKS

    b = sub.add_parser("bench", help="run a benchmark (ff_engine/bench/NAME.py; extra args pass through)")
    b.add_argument("which", choices=sorted(BENCHMARKS))
    an = sub.add_parser("analyze", help="analyze queries: pre- vs post-RoPE query drift across blocks",
                        parents=[_model_args(10.0, 16)])
    an.add_argument("what", choices=["queries"])
    an.add_argument("--out-dir", default="out/analysis")
    sub.add_parser("train-world", help="train an in-repo world model: --world procedural (v2/v3, "
                   "model_adapters/world/train.py) or scroll (v4, model_adapters/world/train_scroll.py)")
    sub.add_parser("serve", help="serve streams over HTTP / WebSocket / a live viewer (serve --help)")
    _add_plan(sub, registry)
    _add_convert(sub, registry)
    return ap


def quiet_vllm_triton_probe() -> None:
    """vLLM logs at import whether *its own* Triton kernels can run ("Triton is installed, but doesn't include CPU
    backend. Disabling Triton."): ff-engine never calls vLLM's Triton paths (it uses vLLM's block pool, its C++
    CPU attention op and flash-attn), so for the CLI the line says nothing and breaks the one-line error
    contract.  Only that module's logger is raised to ERROR; every other vLLM warning still shows."""
    logging.getLogger("vllm.triton_utils").setLevel(logging.ERROR)


def _error_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def train_world(argv: list[str]) -> int:
    """``train-world [--world procedural|scroll] ...``: v2/v3's trainer (``model_adapters.world.train``) or world
    v4's (``model_adapters.world.train_scroll``); each parses the rest itself."""
    world = "procedural"
    if "--world" in argv:
        i = argv.index("--world")
        if i + 1 >= len(argv) or argv[i + 1] not in ("procedural", "scroll"):
            raise ConfigError("--world must be procedural (v2/v3) or scroll (v4)")
        world, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if world == "scroll":
        from model_adapters.world.train_scroll import main as train_main
    else:
        from model_adapters.world.train import main as train_main
    return train_main(argv)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one line on stderr, before any heavy work, nothing written), 1 a failure
    while running (one line; no partial output under the final name), 130 interrupted (Ctrl-C, same cleanup)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_vllm_triton_probe()
    try:
        if argv[:1] == ["train-world"]:  # its own argparse (the world's trainer) takes the rest
            return train_world(argv[1:])
        if argv[:1] == ["serve"]:  # its own argparse (ff_engine.server.__main__) takes the rest
            from ff_engine.server.__main__ import main as serve_main

            return serve_main(argv[1:])
        ap = make_parser()
        args, rest = ap.parse_known_args(argv)
        if rest and args.cmd != "bench":
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.cmd == "generate":
            return cmd_compare(args) if args.compare else cmd_generate(args)
        if args.cmd == "plan":
            return cmd_plan(args)
        if args.cmd == "analyze":
            return cmd_analyze(args)
        if args.cmd == "convert":
            return cmd_convert(args)
        return cmd_bench(args, rest)
    except (FFEngineError, FileNotFoundError) as exc:
        print(f"ff-engine: error: {_error_line(exc)}", file=sys.stderr)
        return 2
    except (RunFailed, OSError) as exc:  # a block failed, the disk filled up: not the input's fault, one line too
        print(f"ff-engine: error: {_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ff-engine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
