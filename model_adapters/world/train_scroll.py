"""Train world model v4 on the scroll world (``scroll.py``): resumable, with a free-running go/no-go at checkpoints.

The recipe is the v2/v3 one (block-causal flow matching with teacher forcing, ``train._TeacherForcingAttention``;
context blocks lightly noised with the level as their timestep) on data that looks like what the model meets at
inference:

* **memory clips** (share ``p_memory``): a long history (up to ``history`` frames: often the prefix pan, then random
  actions), its last two blocks the targets, the 1-3 blocks before them, and older blocks at their true RoPE
  positions, chosen mostly among those whose view overlaps the targets' (what an unbounded cache holds and a good
  policy keeps).  Offsets of hundreds of frames therefore appear in training, as they do after a 75-frame prefix;
* **contiguous clips** of random actions (continuing content: the shifted copy);
* **own rollouts** (share ``p_rollout``): the context after a ground-truth prefix is the model's own KV-cached
  rollout (``train.rollout_context``), the loss asks for the truth: exposure-bias training.
Every frame carries its action (the model's action embedding).

Resumable: every ``save_minutes`` the model, the optimiser, the data generator's state, the step and the curve go to
``OUT.resume.pt`` (and the checkpoint to ``OUT``); ``--resume`` continues exactly there.  At each save the model is
also run free (``free_running_error``: prefill a ground-truth prefix, generate under actions with an unbounded cache)
on validation seeds: the number that says whether training is going anywhere (teacher-forced error alone hides
exposure bias).  Everything is seeded; validation seeds are training seeds never drawn for training batches.

    ff-engine train-world --world scroll --minutes 90 --out model_adapters/world/assets/world_v4.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model_adapters.causal_wan import PRESETS, CausalWanModel, save_checkpoint
from model_adapters.world import scroll
from model_adapters.world.procedural import decode, encode
from model_adapters.world.train import (
    _CachedAttention,
    _TeacherForcingAttention,
    lr_factor,
    param_groups,
    sample_sigma,
    shifted_sigma,
)

VALIDATION_SEEDS = (99_990, 99_991, 99_992, 99_993)  # training seeds the batches never draw (see batch_seed)


def batch_seed(g: torch.Generator) -> int:
    """A training seed for one clip, never one of ``VALIDATION_SEEDS``."""
    return int(torch.randint(len(scroll.TRAIN_SEEDS) - 100, (1,), generator=g))


@dataclass
class Recipe:
    """Everything a run's result depends on (recorded in the checkpoint's train.json and the resume file)."""

    preset: str = "world-v4"
    batch: int = 4
    clip_blocks: int = 8
    lr: float = 1e-3
    shift: float = 2.0
    seed: int = 0
    minutes: float = 90.0  # the cosine anneals over this wall-clock budget (resumes count their own time)
    steps: int = 100_000  # an upper bound; the time budget normally ends training
    p_memory: float = 0.6
    history: int = 330
    p_prefix_history: float = 0.5
    p_rollout: float = 0.0
    rollout_after: float = 0.3  # share of the time budget before own-rollout batches start (early rollouts are noise)
    rollout_steps: int = 2
    rollout_write_t: float = 50.0
    rollout_max_prefix: int = 4
    context_noise: float = 0.1
    p_context_noise: float = 0.5
    target_weight: float = 2.0
    qk_gain_lr: float = 5.0
    action_lr: float = 20.0  # the action embedding's learning-rate multiplier (train.param_groups says why)
    patch: tuple[int, int, int] | None = None  # ablations: override the preset's patch / spatial theta / gain init
    rope_theta_space: float | None = None
    qk_gain_init: float | None = None
    init: str = ""  # a checkpoint whose weights start the run (fresh optimiser): a later stage of a curriculum
    clock: str = "wall"  # "wall" or "cpu" (this process's CPU seconds: an equal budget on a box shared with other work)

    def config(self):
        cfg = PRESETS[self.preset]
        over = {k: v for k, v in (("patch_size", self.patch), ("rope_theta_space", self.rope_theta_space),
                                  ("qk_gain_init", self.qk_gain_init)) if v is not None}
        return cfg.with_(**over, sample_shift=self.shift)


def history_actions(g: torch.Generator, frames: int, p_prefix: float) -> list[int]:
    """A history's actions: with probability ``p_prefix`` the prefix pan first (as at inference), then random runs."""
    head = scroll.prefix_actions() if float(torch.rand(1, generator=g)) < p_prefix else []
    return (head + scroll.random_actions(g, frames))[:frames]


def overlaps(cam_a: int, cam_b: int) -> bool:
    """Whether two views (left edges on the lap) share columns."""
    d = (cam_a - cam_b) % scroll.PANORAMA_W
    return min(d, scroll.PANORAMA_W - d) < scroll.W


def memory_blocks(g: torch.Generator, camera: torch.Tensor, n_blocks: int, fpb: int) -> list[int]:
    """Block starts (sorted) of a memory clip cut from a history with this camera path: the last two blocks are the
    targets, 1-3 recent blocks before them, the rest older blocks, 80 % of the time among those whose view overlaps
    a target's (the content that returns must be somewhere in the context)."""
    L = camera.shape[0] // fpb * fpb
    t0 = L - 2 * fpb
    n_recent = int(torch.randint(1, 4, (1,), generator=g))
    recent = [t0 - k * fpb for k in range(n_recent, 0, -1)]
    old_pool = list(range(0, recent[0], fpb))
    n_old = n_blocks - 2 - n_recent
    target_cams = [int(camera[t]) for t in range(t0, L)]
    useful = [b for b in old_pool if any(overlaps(int(camera[b + fpb - 1]), c) for c in target_cams)]
    chosen: list[int] = []
    for _ in range(min(n_old, len(old_pool))):
        src = [b for b in useful if b not in chosen] if float(torch.rand(1, generator=g)) < 0.8 else []
        src = src or [b for b in old_pool if b not in chosen]
        chosen.append(src[int(torch.randint(len(src), (1,), generator=g))])
    return sorted(chosen) + recent + [t0, t0 + fpb]


def one_clip(g: torch.Generator, r: Recipe, fpb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [F, C, H, W], frame times [F], actions [F]) of one training clip."""
    n = r.clip_blocks * fpb
    if float(torch.rand(1, generator=g)) < r.p_memory:
        length = int(torch.randint(max(n + 3 * fpb, r.history // 3), r.history + 1, (1,), generator=g)) // fpb * fpb
        clip = scroll.make_clip(batch_seed(g), history_actions(g, length, r.p_prefix_history))
        starts = memory_blocks(g, clip.camera, r.clip_blocks, fpb)
        if len(starts) < r.clip_blocks:  # a history too short for old blocks: fall back to its last blocks
            starts = list(range(length - n, length, fpb))
        times = torch.tensor([b + i for b in starts for i in range(fpb)])
    else:
        offset = int(torch.randint(0, 4 * fpb, (1,), generator=g)) * fpb
        clip = scroll.make_clip(batch_seed(g), history_actions(g, offset + n, r.p_prefix_history))
        times = torch.arange(offset, offset + n)
    return encode(clip.frames[times]), times, clip.actions[times]


def training_batch(g: torch.Generator, r: Recipe, fpb: int):
    clips = [one_clip(g, r, fpb) for _ in range(r.batch)]
    return tuple(torch.stack(x) for x in zip(*clips))


# ---- measuring: teacher-forced and free-running ---------------------------------------------------------------
def _generate_block(model, attn, x, sigmas, times, actions):
    b, fpb = x.shape[:2]
    prompts = [model.encode_prompt(torch.zeros(1, model.cfg.text_dim))] * b
    x0_hat = x
    for i, sig in enumerate(sigmas):
        flow = model.forward(x, torch.full((b, fpb), sig * 1000), prompts, times, attn, actions)
        x0_hat = x - sig * flow
        if i + 1 < len(sigmas):
            x = (1 - sigmas[i + 1]) * x0_hat + sigmas[i + 1] * (x0_hat + flow)
    return x0_hat


def _write_block(model, attn, x0, write_t, times, actions, g):
    b, fpb = x0.shape[:2]
    prompts = [model.encode_prompt(torch.zeros(1, model.cfg.text_dim))] * b
    s = write_t / 1000
    noisy = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    attn.write = True
    model.forward(noisy, torch.full((b, fpb), write_t), prompts, times, attn, actions)
    attn.write = False


@torch.no_grad()
def free_running_error(model, seeds=VALIDATION_SEEDS, script: str = "right:48", prefix: int = scroll.PREFIX_FRAMES,
                       window_frames: int | None = None) -> dict:
    """Pixel MSE to the truth of ``script``'s frames generated after a ground-truth ``prefix`` (prefilled into an
    unbounded cache, or a rolling ``window_frames`` one), per frame, mean over ``seeds``; plus copying the last
    prefix frame as a yardstick.  The model's own schedule (``sample_steps`` / ``sample_shift``) and cache-writing
    timestep (``context_noise``), as the engine runs it (``free_rollout``)."""
    fpb = model.geometry.frames_per_block
    acts = torch.tensor(scroll.prefix_actions(prefix) + scroll.parse_actions(script))
    n = acts.shape[0] // fpb * fpb
    errs, copy = [], []
    g = torch.Generator().manual_seed(0)
    for seed in seeds:
        clip = scroll.make_clip(seed, acts[:n])
        out = free_rollout(model, encode(clip.frames)[None], acts[:n], prefix, window_frames, g)
        px, truth = scroll_pixels(out[0, prefix:]), clip.frames[prefix:n]
        errs.append((px - truth).pow(2).mean((1, 2, 3)))
        copy.append((clip.frames[prefix - 1][None] - truth).pow(2).mean((1, 2, 3)))
    e, c = torch.stack(errs).mean(0), torch.stack(copy).mean(0)
    return {"mse_per_frame": [round(float(x), 5) for x in e], "mse": float(e.mean()),
            "mse_first_12": float(e[:12].mean()), "copy_last_prefix_frame": float(c.mean())}


@torch.no_grad()
def free_rollout(model, lat: torch.Tensor, acts: torch.Tensor, prefix: int, window_frames: int | None,
                 g: torch.Generator) -> torch.Tensor:
    """Latents [1, F, ...]: ``lat``'s first ``prefix`` frames (the truth, prefilled), then frames the model generates
    under ``acts`` block by block (an unbounded cache, or a rolling ``window_frames`` one), with the model's own
    schedule and cache-writing timestep; noise from ``g``."""
    cfg, fpb = model.cfg, model.geometry.frames_per_block
    sigmas = [shifted_sigma(t / 1000, cfg.sample_shift) for t in cfg.sample_steps]
    attn = _WindowedCache(1, None if window_frames is None else window_frames * model.geometry.tokens_per_frame)
    out = lat.clone()
    for blk in range(lat.shape[1] // fpb):
        sl = slice(blk * fpb, (blk + 1) * fpb)
        times, a = [torch.arange(sl.start, sl.stop)], acts[sl][None]
        if sl.start >= prefix:
            out[:, sl] = _generate_block(model, attn, torch.randn(out[:, sl].shape, generator=g), sigmas, times, a)
        _write_block(model, attn, out[:, sl], cfg.context_noise, times, a, g)
    return out


def scroll_pixels(latents: torch.Tensor) -> torch.Tensor:
    return decode(latents.float())


class _WindowedCache(_CachedAttention):
    """``_CachedAttention`` that keeps only the newest ``max_tokens`` keys after each write (None: unbounded)."""

    def __init__(self, batch: int, max_tokens: int | None):
        super().__init__(batch)
        self.max_tokens = max_tokens

    def __call__(self, layer, q, k, v, q_pre_rope, positions):
        out = super().__call__(layer, q, k, v, q_pre_rope, positions)
        if self.write and self.max_tokens is not None and layer in self.kv:
            kk, vv = self.kv[layer]
            self.kv[layer] = (kk[:, :, -self.max_tokens:], vv[:, :, -self.max_tokens:])
        return out


@torch.no_grad()
def teacher_forced_error(model, seeds=VALIDATION_SEEDS, sigma: float = 1.0, script: str | None = None) -> dict:
    """Next-block pixel MSE with the truth as context (a contiguous 24-frame clip of random actions, or of
    ``script`` such as ``"right:24"``; the last block predicted in one step from noise level ``sigma``) against
    copying the frame before it."""
    fpb = model.geometry.frames_per_block
    g = torch.Generator().manual_seed(1)
    errs, copy = [], []
    for seed in seeds:
        acts = torch.tensor(history_actions(g, 24, 0.0) if script is None else scroll.parse_actions(script)[:24])
        clip = scroll.make_clip(seed, acts)
        lat = encode(clip.frames)[None]
        attn = _CachedAttention(1)
        for blk in range(24 // fpb - 1):
            sl = slice(blk * fpb, (blk + 1) * fpb)
            _write_block(model, attn, lat[:, sl], 0.0, [torch.arange(sl.start, sl.stop)], acts[sl][None], g)
        sl = slice(24 - fpb, 24)
        x = (1 - sigma) * lat[:, sl] + sigma * torch.randn(lat[:, sl].shape, generator=g)
        pred = _generate_block(model, attn, x, [sigma], [torch.arange(sl.start, sl.stop)], acts[sl][None])
        errs.append(float((scroll_pixels(pred[0]) - clip.frames[sl]).pow(2).mean()))
        copy.append(float((clip.frames[sl.start - 1][None] - clip.frames[sl]).pow(2).mean()))
    return {"next_block_mse": sum(errs) / len(errs), "copy_last_frame": sum(copy) / len(copy)}


# ---- the loop -------------------------------------------------------------------------------------------------
def train_step(model, opt, g: torch.Generator, r: Recipe, lr_scale: float, rollouts: bool = True) -> float:
    """One optimiser step on one batch; returns the loss."""
    fpb, tpf = model.geometry.frames_per_block, model.geometry.tokens_per_frame
    x0, times, acts = training_batch(g, r, fpb)
    b, n_frames = x0.shape[:2]
    n_blocks = n_frames // fpb
    src = x0
    if rollouts and r.p_rollout and float(torch.rand(1, generator=g)) < r.p_rollout:
        src = own_rollout(model, x0, times, acts, r, g)
    attn = _TeacherForcingAttention(b, n_frames, tpf, fpb)
    prompts = [model.encode_prompt(torch.zeros(1, model.cfg.text_dim))] * b
    sig_c = sample_sigma(g, (b, n_blocks), 1.0) * r.context_noise
    sig_c = (sig_c * (torch.rand(b, n_blocks, generator=g) < r.p_context_noise)).repeat_interleave(fpb, 1)
    ctx = (1 - sig_c[..., None, None, None]) * src + sig_c[..., None, None, None] * torch.randn(x0.shape, generator=g)
    model.forward(ctx, sig_c * 1000, prompts, list(times), attn, acts)
    sig = sample_sigma(g, (b, n_blocks), r.shift).repeat_interleave(fpb, 1)
    eps = torch.randn(x0.shape, generator=g)
    xt = (1 - sig[..., None, None, None]) * x0 + sig[..., None, None, None] * eps
    attn.noisy = True
    flow = model.forward(xt, sig * 1000, prompts, list(times), attn, acts)
    per_block = (flow - (eps - x0)).pow(2).mean((2, 3, 4)).reshape(b, n_blocks, fpb).mean(2)
    w = torch.ones(n_blocks)
    w[-2:] = r.target_weight
    loss = (per_block * w).sum(1).mean() / w.sum()
    for group in opt.param_groups:
        group["lr"] = r.lr * lr_scale * group["lr_mult"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def own_rollout(model, x0, times, acts, r: Recipe, g: torch.Generator) -> torch.Tensor:
    """The clip with every block after a 1..``rollout_max_prefix``-block ground-truth prefix replaced by the model's
    own continuation (KV-cached, the clip's own frame times and actions, written at ``rollout_write_t``)."""
    fpb = model.geometry.frames_per_block
    prefix = int(torch.randint(1, r.rollout_max_prefix + 1, (1,), generator=g))
    sigmas = [shifted_sigma(1 - i / r.rollout_steps, r.shift) for i in range(r.rollout_steps)]
    model.eval()
    attn, out = _CachedAttention(x0.shape[0]), x0.clone()
    for blk in range(x0.shape[1] // fpb):
        sl = slice(blk * fpb, (blk + 1) * fpb)
        tb, ab = [t[sl] for t in times], acts[:, sl]
        if blk >= prefix:
            out[:, sl] = _generate_block(model, attn, torch.randn(x0[:, sl].shape, generator=g), sigmas, tb, ab)
        _write_block(model, attn, out[:, sl], r.rollout_write_t, tb, ab, g)
    model.train()
    return out


def save(out: Path, model, opt, g, r: Recipe, state: dict, command: str) -> None:
    """Checkpoint (``out``), its train.json and the resume file, each written to a temporary name then renamed."""
    model.cfg = model.cfg.with_(sample_shift=r.shift)
    tmp = out.with_suffix(".tmp.safetensors")
    save_checkpoint(model, tmp)
    os.replace(tmp, out)
    meta = {"command": command, "recipe": asdict(r), "torch": torch.__version__, "threads": torch.get_num_threads(),
            **state}
    out.with_suffix(".train.json").write_text(json.dumps(meta, indent=1))
    resume = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(),
              "torch_rng": torch.get_rng_state(), "recipe": asdict(r), "state": state}
    torch.save(resume, out.with_suffix(".resume.tmp"))
    os.replace(out.with_suffix(".resume.tmp"), out.with_suffix(".resume.pt"))


def build(r: Recipe, resume: Path | None):
    """(model, optimiser, data generator, state) fresh from the recipe's seed, or exactly as a resume file left them."""
    torch.manual_seed(r.seed)
    model = CausalWanModel(r.config()).train()
    model.rope_dtype = torch.float32  # instance attribute: the saved model and the engine keep float64
    opt = torch.optim.AdamW(param_groups(model, r.qk_gain_lr, r.action_lr), lr=r.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(r.seed + 1)
    state = {"step": 0, "seconds": 0.0, "curve": [], "checks": []}
    if r.init and resume is None:
        from model_adapters.causal_wan.loading import load_into, read_checkpoint

        _, sd = read_checkpoint(r.init, r.config())
        load_into(model, sd)
    if resume is not None:
        blob = torch.load(resume, weights_only=False)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["opt"])
        g.set_state(blob["rng"])
        torch.set_rng_state(blob["torch_rng"])
        state = blob["state"]
    return model, opt, g, state


def check(model, state: dict) -> dict:
    """The go/no-go measurements at a save: teacher-forced and free-running errors on validation seeds."""
    model.eval()
    row = {"step": state["step"], "minutes": round(state["seconds"] / 60, 1), **teacher_forced_error(model)}
    free = free_running_error(model, script="right:48")
    row.update(free_mse=free["mse"], free_mse_first_12=free["mse_first_12"], free_copy=free["copy_last_prefix_frame"])
    model.train()
    return row


def training_clock(name: str):
    """The clock the time budget is spent on: wall time, or this process's CPU time (``"cpu"``), which other jobs on
    a shared box do not consume, so ablations given the same ``minutes`` get the same compute."""
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    if name not in clocks:
        raise ValueError(f"clock must be one of {sorted(clocks)}, got {name!r}")
    return clocks[name]


def run(r: Recipe, out: Path, resume: bool = False, save_minutes: float = 10.0, command: str = "",
        progress: bool = True) -> dict:
    """Train until the time budget (``r.minutes`` of training time, over all resumes) or ``r.steps`` is spent."""
    from tqdm import tqdm

    rfile = out.with_suffix(".resume.pt")
    model, opt, g, state = build(r, rfile if resume and rfile.exists() else None)
    warm = 100
    bar = tqdm(total=int(r.minutes * 60), initial=int(state["seconds"]), unit="s", disable=not progress,
               desc="train world v4")
    last_save = time.perf_counter()
    clock = training_clock(r.clock)
    while state["step"] < r.steps and state["seconds"] < r.minutes * 60:
        t = clock()
        done = state["seconds"] / (r.minutes * 60)
        loss = train_step(model, opt, g, r, lr_factor(done, state["step"], warm), rollouts=done >= r.rollout_after)
        dt = clock() - t
        state["seconds"] += dt
        state["step"] += 1
        bar.update(int(state["seconds"]) - bar.n)
        if state["step"] % 25 == 0 or state["step"] == 1:
            state["curve"].append({"step": state["step"], "loss": round(loss, 5), "seconds": round(state["seconds"])})
            bar.set_postfix(step=state["step"], loss=f"{loss:.4f}")
        if time.perf_counter() - last_save > save_minutes * 60:
            state["checks"].append(check(model, state))
            save(out, model, opt, g, r, state, command)
            last_save = time.perf_counter()
            bar.write(json.dumps(state["checks"][-1]))
    bar.close()
    state["checks"].append(check(model, state))
    save(out, model, opt, g, r, state, command)
    plot_curve(state, out.with_suffix(".loss.png"))
    return state


def plot_curve(state: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([c["step"] for c in state["curve"]], [c["loss"] for c in state["curve"]])
    a.set(xlabel="step", ylabel="flow-matching MSE", yscale="log", title="world v4 training loss")
    ck = state["checks"]
    b.plot([c["step"] for c in ck], [c["next_block_mse"] for c in ck], "o-", label="teacher-forced next block")
    b.plot([c["step"] for c in ck], [c["free_mse"] for c in ck], "s-", label="free-running, 48 frames")
    if ck:
        b.axhline(ck[-1]["copy_last_frame"], color="grey", ls=":", label="copy last frame")
    b.set(xlabel="step", ylabel="pixel MSE", yscale="log", title="validation seeds")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def parse_patch(s: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in s.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("patch is T,H,W (e.g. 1,4,2)")
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ff-engine train-world --world scroll", description=__doc__.splitlines()[0])
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "patch":
            ap.add_argument(flag, type=parse_patch, default=None, help="ablation: token patch T,H,W")
        elif value is None:
            ap.add_argument(flag, type=float, default=None, help="ablation: override the preset")
        else:
            ap.add_argument(flag, type=type(value), default=value)
    ap.add_argument("--out", default=str(Path(__file__).parent / "assets" / "world_v4.safetensors"))
    ap.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt (same recipe)")
    ap.add_argument("--save-minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = vars(ap.parse_args(argv))
    out, resume, save_minutes, threads = Path(a.pop("out")), a.pop("resume"), a.pop("save_minutes"), a.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    r = Recipe(**a)
    if r.qk_gain_init is not None:
        r.qk_gain_init = float(r.qk_gain_init)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "ff-engine train-world --world scroll " + " ".join(sys.argv[1:] if argv is None else argv)
    state = run(r, out, resume=resume, save_minutes=save_minutes, command=command)
    last = state["checks"][-1]
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) after {state['step']} steps: teacher-forced "
          f"{last['next_block_mse']:.4f} (copy {last['copy_last_frame']:.4f}), free-running {last['free_mse']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
