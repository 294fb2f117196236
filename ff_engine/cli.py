"""``ff-engine``: generate / bench.  Every bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import math
import runpy
import sys
import time
from pathlib import Path

import torch

from ff_engine.errors import ConfigError, FFEngineError

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = Path(__file__).resolve().parent / "world" / "assets" / "world_model.safetensors"
# The embedded default: the in-repo world model (trained on CPU, its own decoder; see README for what it can do).
DEFAULT_MODEL = str(EMBEDDED_MODEL)


def _positive_float(name):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {s}")
        return v
    return parse


def requested_frames(args, geometry) -> int:
    """--frames as given, or --seconds in the model's latent frames."""
    if args.frames is not None and args.frames <= 0:
        raise ConfigError(f"--frames must be > 0, got {args.frames}")
    return args.frames or geometry.latent_frames(args.seconds)


def build_model(args):
    from model_adapters.causal_wan import PRESETS, CausalWanModel, load_causal_wan

    if args.model in PRESETS:
        if not args.random_weights:
            raise ConfigError(
                f"--model {args.model} is a preset without weights; pass --random-weights or a checkpoint path"
            )
        torch.manual_seed(args.seed)
        model = CausalWanModel(PRESETS[args.model]).eval()
        with torch.no_grad():  # Wan zero-inits nothing we rely on, but give the head a signal to preview
            model.head.head.weight.normal_(0, 0.02)
        return model
    path = Path(args.model)
    if not path.exists():
        raise ConfigError(f"--model: {args.model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    return load_causal_wan(path, preset=args.preset)  # a checkpoint's recorded config wins over the preset


def load_prompt(args, model):
    cfg = model.cfg
    if not cfg.conditional:
        if args.prompt_embeds is not None:
            raise ConfigError("--prompt-embeds: this model was trained without text conditioning")
        return torch.zeros(1, cfg.text_dim)
    if args.prompt_embeds is None:
        g = torch.Generator().manual_seed(args.seed)
        return torch.randn(min(16, cfg.text_len), cfg.text_dim, generator=g)
    p = Path(args.prompt_embeds)
    if not p.is_file():
        raise ConfigError(f"--prompt-embeds: file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        t = next(iter(load_file(str(p)).values()))
    else:
        t = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(t, dict):
            t = t.get("prompt_embeds", next(iter(t.values())))
    return t[0] if t.dim() == 3 else t


_FF_FLAGS = {"ff_horizon": "horizon", "ff_form": "form", "ff_merge": "merge", "ff_decay": "decay",
             "ff_aggregation": "aggregation", "sink_frames": "sink_frames"}


def _coerce(name: str, typ, raw: str):
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if "bool" in t:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if "int" in t and "None" in t and raw.lower() == "none":
            return None
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"policy parameter {name}: cannot read {raw!r} as {t}") from None
    return raw


def policy_args(args) -> dict:
    """--ff-* flags and repeated --policy-arg key=value, typed from the policy's dataclass fields."""
    from ff_engine.policies import policy_params

    known = policy_params(args.policy)
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
    # unknown names pass through untyped: make_policy rejects them (and unknown policies) with one message
    return {k: _coerce(k, known[k], v) if k in known else v for k, v in raw.items()}


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from ff_engine.engine import Engine, SessionConfig
    from ff_engine.engine.engine import reservation_pages
    from ff_engine.policies import make_policy
    from ff_engine.video import LatentPreviewDecoder, Mp4Writer, WanVAEDecoder, WorldDecoder

    policy = make_policy(args.policy, **policy_args(args))
    model = build_model(args)
    g = model.geometry
    frames = requested_frames(args, g)
    prompt = load_prompt(args, model)
    cfg = SessionConfig(prompt=prompt, num_frames=frames, seed=args.seed, policy=policy,
                        budget_frames=args.budget_frames if policy.bounded else None)
    policy.validate(cfg.budget_frames, g.frames_per_block)
    if args.vae:
        decoder = WanVAEDecoder(args.vae)
    elif model.cfg.decoder == "world-codec":
        decoder = WorldDecoder()
    else:
        decoder = LatentPreviewDecoder(g.vae_stride[1], g.vae_stride[0])
    # Size the pool for exactly this stream unless told otherwise: admission then proves the budget holds.
    num_pages = args.num_pages or reservation_pages(g, args.page_size, cfg)
    engine = Engine(model, num_pages=num_pages, page_size=args.page_size, backend=args.backend)
    writer = Mp4Writer(args.out, fps=g.fps)
    session = engine.add_session(cfg)
    reserved = engine.cache.pool.reserved(session.id)
    t0, video_frames = time.perf_counter(), 0
    bar = tqdm(total=session.num_blocks, unit="block", desc=f"{policy.name}", disable=args.quiet)
    try:
        while session.id in engine.sessions:
            for r in engine.step([session.id]):
                if r.error:
                    raise FFEngineError(f"generation failed at block {r.block}: {r.error}")
                held = engine.cache.pages_held(session.id) if session.id in engine.sessions else 0
                if decoder.streaming:
                    px = decoder.decode(r.latents)
                    writer.write(px)
                    video_frames += len(px)
                bar.update(1)
                bar.set_postfix(fps=f"{g.video_frames(session.block * g.frames_per_block) / (time.perf_counter() - t0):.2f}",
                                pages=f"{held}/{reserved}")
        if not decoder.streaming:
            px = decoder.decode(torch.cat(session.latents))
            writer.write(px)
            video_frames = len(px)
    finally:
        bar.close()
        writer.close()
        engine.cancel(session.id)
    dt = time.perf_counter() - t0
    print(f"wrote {args.out}: {video_frames} frames ({frames} latent) in {dt:.1f}s, policy {policy.name}, "
          f"budget {cfg.budget_frames} frames, {reserved} pages reserved x {engine.cache.bytes_per_page()} B")
    return 0


def cmd_plan(args) -> int:
    import json

    from ff_engine.plan import parse_bytes, plan
    from model_adapters.causal_wan import PRESETS

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    cfg = PRESETS[args.preset]
    weights = 0 if args.no_weights else sum(_param_count(cfg)) * args.dtype_bytes
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


def _param_count(cfg):
    """Parameter counts of the causal-Wan model, from its config (no allocation)."""
    d, f, L = cfg.dim, cfg.ffn_dim, cfg.num_layers
    per_block = 8 * (d * d + d) + 4 * d + 2 * d + (d * f + f + f * d + d) + 6 * d
    yield L * per_block
    yield cfg.in_dim * d * 4 + d + cfg.text_dim * d + d + d * d + d + cfg.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
    yield d * 4 * cfg.out_dim + 4 * cfg.out_dim + 2 * d


def cmd_analyze(args) -> int:
    from ff_engine.analysis import analyze_queries, write

    model = build_model(args)
    result = analyze_queries(model, load_prompt(args, model), requested_frames(args, model.geometry), args.budget_frames, args.seed, args.page_size,
                             args.backend)
    path = write(result, args.out_dir, f"{args.model}: query drift over {result['blocks']} blocks")
    sm = result["summary"]
    print(f"wrote {path} (+ .png): mean relative drift of the query mean at the last block: "
          f"pre-RoPE {sm['pre_rope_final_drift']:.3f}, post-RoPE {sm['post_rope_final_drift']:.3f}")
    return 0


def cmd_bench(args, rest) -> int:
    script = REPO / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        raise ConfigError(f"benchmark {args.which!r} not found at {script} (run from a source checkout)")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"ff-engine: error: {message}\n")


def _model_args(seconds: float, page_size: int) -> argparse.ArgumentParser:
    """What generate and analyze share: model, prompt, length, engine (a fresh parser per command, so their
    defaults stay separate)."""
    model_args = _Parser(add_help=False)
    model_args.add_argument("--model", default=DEFAULT_MODEL,
                            help="checkpoint path or preset name (with --random-weights)")
    model_args.add_argument("--preset", default="wan-1.3b",
                            help="geometry defaults for a checkpoint (num_heads, text_len, grid)")
    model_args.add_argument("--random-weights", action="store_true", help="random weights for a preset (smoke runs)")
    model_args.add_argument("--prompt-embeds", default=None, help="[L, text_dim] tensor file (.pt / .safetensors)")
    length = model_args.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=_positive_float("--seconds"), default=seconds)
    length.add_argument("--frames", type=int, default=None, help="latent frames (instead of --seconds)")
    model_args.add_argument("--budget-frames", type=int, default=6, help="latent frames of past KV kept per layer")
    model_args.add_argument("--seed", type=int, default=0)
    model_args.add_argument("--page-size", type=int, default=page_size)
    model_args.add_argument("--backend", default="auto")
    return model_args


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ff-engine", description="Long AR video generation under a bounded paged KV cache")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate one video to an MP4", parents=[_model_args(5.0, 32)])
    g.add_argument("--policy", default="window")
    g.add_argument("--sink-frames", type=int, default=None)
    g.add_argument("--ff-horizon", type=int, default=None, help="future-forcing: future frames of the query proxy")
    g.add_argument("--ff-form", choices=["cheap", "exact"], default=None)
    g.add_argument("--ff-merge", choices=["none", "log-mass", "affine"], default=None)
    g.add_argument("--ff-decay", type=float, default=None)
    g.add_argument("--ff-aggregation", choices=["mean", "max"], default=None)
    g.add_argument("--policy-arg", action="append", metavar="KEY=VALUE", help="any policy parameter (repeatable)")
    g.add_argument("--vae", default=None, help="local diffusers AutoencoderKLWan folder (else a latent preview)")
    g.add_argument("--num-pages", type=int, default=None, help="pool size (default: exactly this stream's reservation)")
    g.add_argument("--out", default="out/video.mp4")
    g.add_argument("--quiet", action="store_true")
    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ (extra args pass through)")
    b.add_argument("which", choices=["attention", "policy_overhead", "throughput", "quality"])
    an = sub.add_parser("analyze", help="analyze queries: pre- vs post-RoPE query drift across blocks",
                        parents=[_model_args(10.0, 16)])
    an.add_argument("what", choices=["queries"])
    an.add_argument("--out-dir", default="out/analysis")
    sub.add_parser("train-world", help="train the in-repo world model (see ff_engine/world/train.py)")
    pl = sub.add_parser("plan", help="KV bytes and streams per GPU, bounded vs unbounded")
    pl.add_argument("--preset", default="wan-1.3b")
    pl.add_argument("--gpu-mem", default="80GiB")
    pl.add_argument("--budget-frames", type=int, default=21)
    pl.add_argument("--seconds", type=_positive_float("--seconds"), default=60.0)
    pl.add_argument("--page-size", type=int, default=32)
    pl.add_argument("--dtype-bytes", type=int, default=2, choices=[1, 2, 4])
    pl.add_argument("--no-weights", action="store_true", help="do not subtract the model weights")
    pl.add_argument("--json", action="store_true")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-world"]:  # its own argparse (ff_engine.world.train) takes the rest
        from ff_engine.world.train import main as train_main

        return train_main(argv[1:])
    ap = make_parser()
    args, rest = ap.parse_known_args(argv)
    if rest and args.cmd != "bench":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "generate":
            return cmd_generate(args)
        if args.cmd == "plan":
            return cmd_plan(args)
        if args.cmd == "analyze":
            return cmd_analyze(args)
        return cmd_bench(args, rest)
    except (FFEngineError, FileNotFoundError) as exc:
        print(f"ff-engine: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
