"""Train the in-repo world model: block-causal flow matching with teacher forcing, on CPU.

For a batch of clips of ``clip_frames`` frames (blocks of 3):
  1. a clean pass over the whole clip with a block-causal mask produces every block's K/V — what inference
     writes into the cache.  Half the blocks are lightly noised first (sigma <= ``context_noise``, the timestep
     says so): at inference the context is the model's own imperfect output, not the ground truth;
  2. a noisy pass: each block gets its own noise level sigma = shift u / (1 + (shift - 1) u), u ~ U(0, 1) (every
     level the sampler visits, not only four), x_t = (1 - sigma) x0 + sigma eps; its queries attend to the
     clean K/V of earlier blocks and to itself (no mask inside the block), as at inference;
  3. the loss is the MSE between the predicted flow and eps - x0.
Half the clips are *sparse*: 1-3 blocks from the distant past, a gap of up to ``max_gap`` frames, then recent
blocks, at their true RoPE positions.  That is what a bounded cache that kept old frames looks like, and it is
what teaches the model to look back further than one clip: the world's subjects and places come back after
gaps of tens of frames.  Gradients flow through both passes (CausVid-style teacher forcing).

Why not Self-Forcing's four warped steps: those end at sigma = 0.625 and only work after DMD distillation; an
MSE-trained model sampled there returns the conditional mean (blur; the v0 model did exactly that).  The model
therefore records its own sampling schedule in its config (``sample_steps`` / ``sample_shift``: 8 steps down to
sigma = 0.22), which the engine uses (``FlowMatchSchedule.for_model``).  Everything is seeded: the same command
reproduces the same checkpoint on the same software.

    ff-engine train-world --steps 1300 --out model_adapters/world/assets/world_model.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model_adapters.causal_wan import PRESETS, CausalWanModel, save_checkpoint
from model_adapters.world.procedural import TRAIN_SEEDS, encode, make_clip

ASSETS = Path(__file__).parent / "assets"
N_TARGET = 2  # target blocks at the end of a memory clip


class _TeacherForcingAttention:
    """Masked dense attention for the two training passes (the engine's paged path is for inference)."""

    def __init__(self, batch: int, frames: int, tokens_per_frame: int, frames_per_block: int, device="cpu"):
        self.b, self.n = batch, frames * tokens_per_frame
        block_of = (torch.arange(frames).repeat_interleave(tokens_per_frame) // frames_per_block).to(device)
        self.causal = block_of[:, None] >= block_of[None, :]  # clean pass: blocks <= own
        self.past = block_of[:, None] > block_of[None, :]  # noisy pass -> clean keys of earlier blocks
        self.same = block_of[:, None] == block_of[None, :]  # noisy pass -> its own block
        self.clean_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.noisy = False

    def __call__(self, layer, q, k, v, q_pre_rope, positions):
        b, n = self.b, self.n
        q, k, v = (x.reshape(b, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
        if not self.noisy:
            self.clean_kv[layer] = (k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal)
        else:
            ck, cv = self.clean_kv[layer]
            mask = torch.cat([self.past, self.same], dim=1)
            out = F.scaled_dot_product_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), attn_mask=mask)
        return out.transpose(1, 2).reshape(b * n, out.shape[1], out.shape[3])


class _CachedAttention:
    """KV-cached attention for the no-grad rollouts of rollout training: a block's queries attend to every
    earlier block's K/V and to their own block (as the engine's cache does, unbounded); ``write`` appends."""

    def __init__(self, batch: int):
        self.b, self.kv, self.write = batch, {}, False

    def __call__(self, layer, q, k, v, q_pre_rope, positions):
        b = self.b
        q, k, v = (x.reshape(b, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # [B, H, n, D]
        if layer in self.kv:
            pk, pv = self.kv[layer]
            kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        else:
            kk, vv = k, v
        if self.write:
            self.kv[layer] = (kk, vv)
        out = F.scaled_dot_product_attention(q, kk, vv)
        return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])


@torch.no_grad()
def rollout_context(model, x0: torch.Tensor, times: torch.Tensor, prefix_blocks: int, fpb: int,
                    sigmas: list[float], write_sigma: float, rng: torch.Generator) -> torch.Tensor:
    """The clip as the model itself would have continued it: the first ``prefix_blocks`` blocks are the ground
    truth, every later block is generated block by block (deterministic Euler over ``sigmas``, the last x0
    prediction kept) from the K/V of the blocks before it, each finished block written to the cache re-noised
    to ``write_sigma`` as inference writes it.  Exposure-bias training (Resampling / Self-Forcing style): the
    loss then asks for the ground truth given this history, so the model learns to pull its own drift back."""
    b, n_frames = x0.shape[:2]
    prompts = [model.encode_prompt(torch.zeros(1, model.cfg.text_dim, device=x0.device))] * b
    attn = _CachedAttention(b)
    out = x0.clone()
    for blk in range(n_frames // fpb):
        sl = slice(blk * fpb, (blk + 1) * fpb)
        tb = [t[sl] for t in times]
        if blk >= prefix_blocks:
            x = torch.randn(x0[:, sl].shape, generator=rng).to(x0.device)
            attn.write = False
            for i, sig in enumerate(sigmas):
                flow = model.forward(x, torch.full((b, fpb), sig * 1000, device=x0.device), prompts, tb, attn)
                x0_hat = x - sig * flow
                nxt = sigmas[i + 1] if i + 1 < len(sigmas) else None
                if nxt is not None:
                    x = (1 - nxt) * x0_hat + nxt * (x0_hat + flow)
            out[:, sl] = x0_hat
        attn.write = True
        noise = torch.randn(x0[:, sl].shape, generator=rng).to(x0.device)
        model.forward((1 - write_sigma) * out[:, sl] + write_sigma * noise,
                      torch.full((b, fpb), write_sigma * 1000, device=x0.device), prompts, tb, attn)
    return out


def frame_times(rng: torch.Generator, n_blocks: int, fpb: int, p_sparse: float, max_gap: int) -> list[int]:
    """Frame indices (from 0) of one training clip of ``n_blocks`` blocks.  Contiguous, or (with probability
    ``p_sparse``) 1-3 blocks from the distant past, a gap of ``fpb .. max_gap`` frames, then recent contiguous
    blocks: the situation of a bounded cache that kept old frames, so the model learns to retrieve what it saw
    long ago (a model trained only on short contiguous clips never looks further back than its clip)."""
    if n_blocks < 2 or float(torch.rand(1, generator=rng)) >= p_sparse:
        return list(range(n_blocks * fpb))
    k_old = int(torch.randint(1, min(3, n_blocks - 1) + 1, (1,), generator=rng))
    gap = int(torch.randint(fpb, max_gap + 1, (1,), generator=rng))
    old = list(range(k_old * fpb))
    return old + list(range(k_old * fpb + gap, n_blocks * fpb + gap))


def memory_frame_times(rng: torch.Generator, visible: torch.Tensor, n_blocks: int, n_target: int, fpb: int,
                       min_gap: int) -> list[int] | None:
    """Frame indices of a *memory* clip cut from a long ground-truth history (``visible`` [L, S]): ``n_target``
    target blocks where a subject comes back after at least ``min_gap`` frames out of view, the 1-3 blocks just
    before them, and distant-past blocks (sorted, at their true positions) chosen mostly among those where that
    subject was in view — the cache a memory-keeping policy would hold.  The subject's look at its return can
    only come from those distant blocks, so this is the example that teaches retrieval (in plain clips it is a
    few tokens in thousands).  None when the history has no such return."""
    from model_adapters.world.metrics import returning_pairs

    L = visible.shape[0]
    back = returning_pairs(visible, min_gap=min_gap, window=fpb)  # [L, S]
    events = [(int(t), int(s)) for t, s in back.nonzero() if t >= 2 * fpb and t + n_target * fpb <= L]
    if not events:
        return None
    t, s = events[int(torch.randint(len(events), (1,), generator=rng))]
    # t is one of the return's first fpb frames; the targets start up to fpb - 1 frames before it
    t0 = t - int(torch.randint(0, fpb, (1,), generator=rng))
    n_recent = int(torch.randint(1, 4, (1,), generator=rng))
    n_old = n_blocks - n_target - n_recent
    old_starts = list(range(t0 - (n_recent + 1) * fpb, -1, -fpb))  # block starts aligned to the targets
    if n_old < 1 or len(old_starts) < n_old:
        return None
    seen = [b for b in old_starts if visible[b:b + fpb, s].any()]
    chosen: list[int] = []
    pool = list(old_starts)
    for _ in range(n_old):  # each slot: a block showing the subject (p = 0.8) while any is left, else any block
        src = [b for b in seen if b not in chosen] if float(torch.rand(1, generator=rng)) < 0.8 else []
        src = src or [b for b in pool if b not in chosen]
        chosen.append(src[int(torch.randint(len(src), (1,), generator=rng))])
    starts = sorted(chosen) + [t0 - k * fpb for k in range(n_recent, 0, -1)] + [t0 + k * fpb for k in range(n_target)]
    return [b + i for b in starts for i in range(fpb)]


def training_batch(rng: torch.Generator, batch: int, n_blocks: int, fpb: int, p_sparse: float, max_gap: int,
                   p_memory: float = 0.0, n_target: int = N_TARGET, history: int = 192, min_gap: int = 15):
    """(latents [B, F, C, H, W], frame times [B, F]) of clips drawn from training seeds at random start frames:
    memory clips with probability ``p_memory`` (see ``memory_frame_times``), else plain / sparse clips."""
    lat, times = [], []
    while len(lat) < batch:
        seed = int(torch.randint(len(TRAIN_SEEDS), (1,), generator=rng))
        start = int(torch.randint(0, 240, (1,), generator=rng))
        if p_memory and float(torch.rand(1, generator=rng)) < p_memory:
            clip = make_clip(TRAIN_SEEDS[seed], history, start=start)
            rel = memory_frame_times(rng, clip.visible, n_blocks, n_target, fpb, min_gap)
            if rel is None:
                continue
        else:
            rel = frame_times(rng, n_blocks, fpb, p_sparse, max_gap)
            clip = make_clip(TRAIN_SEEDS[seed], rel[-1] + 1, start=start)
        lat.append(encode(clip.frames[rel]))
        times.append(torch.tensor(rel) + start)
    return torch.stack(lat), torch.stack(times)


class ClipStream(torch.utils.data.IterableDataset):
    """Training batches rendered by ``DataLoader`` worker processes (``train-world --workers N``).

    The procedural world is rendered in Python on the CPU (5-25 ms per clip): one process cannot feed a GPU, which
    finishes a small model's step in a fraction of that.  Worker ``w`` of ``N`` draws its batches with its own
    generator (seed ``seed * 7919 + w``) and ``DataLoader`` returns them round-robin, so a run is reproducible for
    a fixed ``(seed, N)`` — but not equal to the in-process stream of ``--workers 0``, which stays the committed
    recipe's exact sequence."""

    def __init__(self, seed: int, **batch_kw):
        super().__init__()
        self.seed, self.batch_kw = seed, batch_kw

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = torch.Generator().manual_seed(self.seed * 7919 + worker)
        while True:
            yield training_batch(rng, **self.batch_kw)


def batches(rng: torch.Generator, workers: int, seed: int, **batch_kw):
    """The training batches: drawn in-process from ``rng`` (``workers == 0``), else from ``ClipStream``."""
    if workers == 0:
        while True:
            yield training_batch(rng, **batch_kw)
    loader = torch.utils.data.DataLoader(ClipStream(seed, **batch_kw), batch_size=None, num_workers=workers,
                                         prefetch_factor=4, persistent_workers=False)
    yield from loader


def lr_factor(progress: float, step: int, warm: int) -> float:
    """Linear warm-up over ``warm`` steps or the first 5 % of ``progress`` (in [0, 1]; of steps or of the time
    budget), whichever ends first, and a cosine from 1 to 0 over ``progress``.  Without a time budget
    ``progress = step / steps`` and ``warm = steps // 20``: the committed recipes' schedule exactly."""
    return min(1.0, max((step + 1) / warm, progress / 0.05)) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def qk_gains(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every self-attention q/k RMSNorm gain: the attention's temperature (``param_groups``)."""
    return [(n, p) for n, p in model.named_parameters() if "self_attn.norm_q" in n or "self_attn.norm_k" in n]


def param_groups(model: torch.nn.Module, qk_gain_lr: float, action_lr: float = 1.0) -> list[dict]:
    """AdamW groups: the self-attention q/k RMSNorm gains learn ``qk_gain_lr`` times faster (no weight decay), and
    an action embedding (world v4) ``action_lr`` times faster (no weight decay: it starts at zero, and it is added
    to a timestep embedding whose norm is tens, so at the base rate it stays negligible; measured on the first v4
    run: row norms 0.13-0.17 after 2,853 steps, and swapping left for right changed the next block by 3 %).

    With q/k RMSNorm a logit is bounded by the product of the two gains times sqrt(head_dim): at gains near
    their initial 1 a 64-dim head cannot put most of its weight on one of thousands of keys, so a small model's
    attention stays diffuse and its next frame is a blur of the context instead of a copy of the right place
    (measured on v3: the sharpest head gave 18 % of its weight to the same position one frame back).  The gains
    are the attention's temperature; letting them move fast is the cheap cure."""
    gains = [p for _, p in qk_gains(model)]
    actions = [p for n, p in model.named_parameters() if n.startswith("action_embedding")]
    ids = {id(p) for p in gains + actions}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr_mult": 1.0}, {"params": gains, "lr_mult": qk_gain_lr, "weight_decay": 0.0}]
    if actions:
        groups.append({"params": actions, "lr_mult": action_lr, "weight_decay": 0.0})
    return groups


def shifted_sigma(u, shift: float):
    """sigma = shift * u / (1 + (shift - 1) u): the sampler's timestep warp (``FlowMatchSchedule``) of u in [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigma(rng: torch.Generator, shape, shift: float) -> torch.Tensor:
    """``shifted_sigma`` of u ~ U(0, 1): every noise level, weighted as the sampler uses them."""
    return shifted_sigma(torch.rand(shape, generator=rng), shift)


def _prepare_model(init: str | None, preset: str, device: str, clip_frames: int):
    """The model to train (``init``'s checkpoint, else a fresh ``preset``) on ``device`` in train mode;
    ``(model, cfg, device, frames_per_block, n_blocks)``."""
    if init:
        from model_adapters.causal_wan import load_causal_wan

        model = load_causal_wan(init, preset=preset)
        cfg = model.cfg
    else:
        cfg = PRESETS[preset]
        model = CausalWanModel(cfg)
    dev = torch.device(device)
    model.to(dev).train()
    fpb = model.geometry.frames_per_block
    if clip_frames % fpb:
        raise ValueError(f"clip_frames must be a multiple of {fpb}")
    return model, cfg, dev, fpb, clip_frames // fpb


def _context_source(model, x0, times, rng, fpb, p_rollout, rollout_max_prefix, rollout_sigmas, rollout_write_t):
    """What the context pass sees: the ground truth, or (a ``p_rollout`` share of batches) the model's own
    continuation of a 1..``rollout_max_prefix``-block prefix of it."""
    src = x0
    if p_rollout and float(torch.rand(1, generator=rng)) < p_rollout:
        prefix = int(torch.randint(1, rollout_max_prefix + 1, (1,), generator=rng))
        model.eval()
        src = rollout_context(model, x0, times, prefix, fpb, rollout_sigmas, rollout_write_t / 1000, rng)
        model.train()
    return src


def _flow_loss(model, x0, src, times, rng, prompt, block_weight, *, batch, clip_frames, n_blocks, fpb, dev, shift,
               context_noise, p_context_noise):
    """The teacher-forced flow-matching loss of one batch: a clean pass over the (lightly noised) context ``src``
    fills the cache, then the noisy pass predicts the flow of every block, weighted per block."""
    attn = _TeacherForcingAttention(batch, clip_frames, model.geometry.tokens_per_frame, fpb, dev)
    prompts = [model.encode_prompt(prompt)] * batch
    # clean pass: the context as the cache holds it, lightly noised on half the blocks (robustness to
    # the model's own imperfect frames at inference, where the context is its own output)
    sig_c = sample_sigma(rng, (batch, n_blocks), 1.0) * context_noise
    sig_c = sig_c * (torch.rand(batch, n_blocks, generator=rng) < p_context_noise)
    sig_c = sig_c.repeat_interleave(fpb, dim=1)[..., None, None, None].to(dev)
    ctx = (1 - sig_c) * src + sig_c * torch.randn(x0.shape, generator=rng).to(dev)
    model.forward(ctx, sig_c[..., 0, 0, 0] * 1000, prompts, list(times), attn)  # fills attn.clean_kv
    sig = sample_sigma(rng, (batch, n_blocks), shift).repeat_interleave(fpb, dim=1).to(dev)  # per block
    eps = torch.randn(x0.shape, generator=rng).to(dev)
    xt = (1 - sig[..., None, None, None]) * x0 + sig[..., None, None, None] * eps
    attn.noisy = True
    flow = model.forward(xt, sig * 1000, prompts, list(times), attn)
    per_block = (flow - (eps - x0)).pow(2).mean((2, 3, 4)).reshape(batch, n_blocks, fpb).mean(2)  # [B, blocks]
    return (per_block * block_weight).sum(1).mean() / block_weight.sum()


def _optimizer_step(model, opt, loss, lr: float, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * factor * group["lr_mult"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def train(steps: int, batch: int = 4, clip_frames: int = 24, lr: float = 1e-3, seed: int = 0, shift: float = 2.0,
          p_sparse: float = 0.5, max_gap: int = 48, context_noise: float = 0.1, log_every: int = 50,
          progress: bool = True, checkpoint=None, checkpoint_every: int = 0, init: str | None = None,
          p_memory: float = 0.0, target_weight: float = 1.0, min_gap: int = 15, p_context_noise: float = 0.5,
          p_rollout: float = 0.0, rollout_steps: int = 4, rollout_write_t: float = 100.0,
          rollout_max_prefix: int = 3, device: str = "cpu",
          preset: str = "world-tiny", qk_gain_lr: float = 1.0, workers: int = 0,
          max_minutes: float | None = None) -> tuple[CausalWanModel, list[dict]]:
    """``init``: fine-tune this checkpoint instead of starting from random weights.  ``p_memory``: share of
    memory clips (``memory_frame_times``); ``target_weight``: loss weight of every clip's last two blocks.
    ``p_context_noise``: share of context blocks noised (each at its own level, uniform up to
    ``context_noise``; the level is the context pass's timestep — Diffusion Forcing / GameNGen).  ``p_rollout``:
    share of batches whose context after a 1..``rollout_max_prefix``-block ground-truth prefix is the model's own
    rollout (``rollout_context``: ``rollout_steps`` Euler steps, written at timestep ``rollout_write_t``).
    ``device``: where the model trains (every random draw still comes from the CPU generator, so a run is the
    same on any device up to float rounding); ``preset``: the architecture when starting from scratch.
    ``workers``: render clips in that many processes (``ClipStream``).  ``max_minutes``: a wall-clock budget —
    the learning rate follows the cosine over whichever runs out first, steps or time, and training stops when
    the budget is spent, so a run on a lent machine ends annealed and saved before its limit (the last curve
    entry then says ``stopped: "time"``)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model, cfg, dev, fpb, n_blocks = _prepare_model(init, preset, device, clip_frames)
    opt = torch.optim.AdamW(param_groups(model, qk_gain_lr), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    rng = torch.Generator().manual_seed(seed + 1)
    prompt = torch.zeros(1, cfg.text_dim, device=dev)
    block_weight = torch.ones(n_blocks, device=dev)
    block_weight[-N_TARGET:] = target_weight  # the memory clips' targets (the last blocks of every clip)
    rollout_sigmas = [shifted_sigma(1 - i / rollout_steps, shift) for i in range(rollout_steps)]
    curve = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc="train world model")
    stream = batches(rng, workers, seed, batch=batch, n_blocks=n_blocks, fpb=fpb, p_sparse=p_sparse, max_gap=max_gap,
                     p_memory=p_memory, n_target=N_TARGET, min_gap=min_gap)
    try:
        for i, (x0, times) in zip(bar, stream):
            done = max(i / steps, (time.perf_counter() - t0) / 60 / max_minutes if max_minutes else 0.0)
            if done >= 1.0 and i > 0:  # a budget too small for one step still trains one
                curve.append({"step": i, "loss": curve[-1]["loss"],  # step 0 is always logged
                              "seconds": time.perf_counter() - t0, "stopped": "time"})
                break
            x0 = x0.to(dev)
            src = _context_source(model, x0, times, rng, fpb, p_rollout, rollout_max_prefix, rollout_sigmas,
                                  rollout_write_t)
            loss = _flow_loss(model, x0, src, times, rng, prompt, block_weight, batch=batch, clip_frames=clip_frames,
                              n_blocks=n_blocks, fpb=fpb, dev=dev, shift=shift, context_noise=context_noise,
                              p_context_noise=p_context_noise)
            _optimizer_step(model, opt, loss, lr, lr_factor(done, i, warm))
            if i % log_every == 0 or i == steps - 1:
                curve.append({"step": i, "loss": loss.item(), "seconds": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
            if checkpoint and checkpoint_every and (i + 1) % checkpoint_every == 0:
                checkpoint(model, curve, i + 1)
    finally:
        bar.close()
        stream.close()  # stops the DataLoader workers
    return model.eval(), curve


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ff-engine train-world", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--clip-frames", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--shift", type=float, default=2.0, help="noise-level shift of training and sampling")
    ap.add_argument("--p-sparse", type=float, default=0.5, help="share of clips with a distant-past chunk")
    ap.add_argument("--max-gap", type=int, default=48, help="largest gap (frames) between past chunk and recent")
    ap.add_argument("--context-noise", type=float, default=0.1, help="largest noise level of context augmentation")
    ap.add_argument("--p-memory", type=float, default=0.0, help="share of memory clips (a subject's return + "
                    "distant blocks that show it)")
    ap.add_argument("--min-gap", type=int, default=15, help="memory clips: frames the subject was out of view")
    ap.add_argument("--target-weight", type=float, default=1.0, help="loss weight of each clip's last 2 blocks")
    ap.add_argument("--p-context-noise", type=float, default=0.5, help="share of context blocks noised")
    ap.add_argument("--p-rollout", type=float, default=0.0, help="share of batches trained on the model's own "
                    "rollout after a ground-truth prefix (exposure-bias training)")
    ap.add_argument("--rollout-steps", type=int, default=4, help="Euler steps of those rollouts")
    ap.add_argument("--rollout-write-t", type=float, default=100.0, help="timestep rollouts write blocks at")
    ap.add_argument("--sample-context-t", type=float, default=None, help="record this cache-writing timestep "
                    "(context_noise) in the checkpoint's config; default: keep the model's")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (no vLLM needed)")
    ap.add_argument("--preset", default="world-tiny", help="architecture when starting from scratch")
    ap.add_argument("--qk-gain-lr", type=float, default=1.0, help="learning-rate multiple of the q/k RMSNorm "
                    "gains (the attention's temperature; see param_groups)")
    ap.add_argument("--workers", type=int, default=0, help="processes rendering training clips (ClipStream; 0: "
                    "in-process, the committed recipes' exact stream)")
    ap.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget: the LR anneals over it and "
                    "training stops when it is spent (for a lent GPU's limit)")
    ap.add_argument("--init", default=None, help="fine-tune this checkpoint (its train.json is kept as 'init')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=250, help="write the checkpoint every N steps")
    ap.add_argument("--out", default=str(ASSETS / "world_model.safetensors"))
    return ap


def _command(a) -> str:
    """The command line recorded in the checkpoint's train.json: the recipe's flags, the optional ones
    only where they were given."""
    command = (f"ff-engine train-world --steps {a.steps} --batch {a.batch} --clip-frames {a.clip_frames} "
               f"--lr {a.lr} --shift {a.shift} --p-sparse {a.p_sparse} --max-gap {a.max_gap} "
               f"--context-noise {a.context_noise} --seed {a.seed}")
    if a.p_memory or a.init:
        command += f" --p-memory {a.p_memory} --min-gap {a.min_gap} --target-weight {a.target_weight}"
    if a.p_context_noise != 0.5 or a.p_rollout:
        command += (f" --p-context-noise {a.p_context_noise} --p-rollout {a.p_rollout} --rollout-steps "
                    f"{a.rollout_steps} --rollout-write-t {a.rollout_write_t}")
    if a.sample_context_t is not None:
        command += f" --sample-context-t {a.sample_context_t}"
    if a.device != "cpu" or a.preset != "world-tiny":
        command += f" --device {a.device} --preset {a.preset}"
    if a.qk_gain_lr != 1.0:
        command += f" --qk-gain-lr {a.qk_gain_lr}"
    if a.workers:
        command += f" --workers {a.workers}"
    if a.max_minutes:
        command += f" --max-minutes {a.max_minutes}"
    if a.init:
        command += f" --init {a.init}"
    return command


def _plot_loss(curve, png) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve])
        ax.set(xlabel="step", ylabel="flow-matching MSE", yscale="log", title="world model training loss")
        fig.tight_layout()
        fig.savefig(png, dpi=90)
    except Exception as exc:  # noqa: BLE001 -- the curve is in the JSON either way
        print(f"(no plot: {exc})")


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = _command(a)
    init_meta = None
    if a.init and Path(a.init).with_suffix(".train.json").exists():
        init_meta = json.loads(Path(a.init).with_suffix(".train.json").read_text())

    def write(model, curve, step):
        if next(model.parameters()).device.type != "cpu":
            model = copy.deepcopy(model).cpu()
        model.cfg = model.cfg.with_(sample_shift=a.shift)
        if a.sample_context_t is not None:
            model.cfg = model.cfg.with_(context_noise=a.sample_context_t)
        save_checkpoint(model, out)
        meta = {"command": command, "step": step, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "curve": curve, "init": init_meta}
        out.with_suffix(".train.json").write_text(json.dumps(meta, indent=1))

    model, curve = train(a.steps, a.batch, a.clip_frames, a.lr, a.seed, a.shift, a.p_sparse, a.max_gap,
                         a.context_noise, checkpoint=write, checkpoint_every=a.checkpoint_every, init=a.init,
                         p_memory=a.p_memory, target_weight=a.target_weight, min_gap=a.min_gap,
                         p_context_noise=a.p_context_noise, p_rollout=a.p_rollout, rollout_steps=a.rollout_steps,
                         rollout_write_t=a.rollout_write_t, device=a.device, preset=a.preset,
                         qk_gain_lr=a.qk_gain_lr, workers=a.workers, max_minutes=a.max_minutes)
    write(model, curve, curve[-1]["step"] if curve[-1].get("stopped") else a.steps)
    _plot_loss(curve, out.with_suffix(".loss.png"))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), loss {curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
