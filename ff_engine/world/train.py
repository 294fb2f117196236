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

    ff-engine train-world --steps 1300 --out ff_engine/world/assets/world_model.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ff_engine.world.procedural import TRAIN_SEEDS, encode, make_clip
from model_adapters.causal_wan import PRESETS, CausalWanModel, save_checkpoint

ASSETS = Path(__file__).parent / "assets"


class _TeacherForcingAttention:
    """Masked dense attention for the two training passes (the engine's paged path is for inference)."""

    def __init__(self, batch: int, frames: int, tokens_per_frame: int, frames_per_block: int):
        self.b, self.n = batch, frames * tokens_per_frame
        block_of = torch.arange(frames).repeat_interleave(tokens_per_frame) // frames_per_block
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


def training_batch(rng: torch.Generator, batch: int, n_blocks: int, fpb: int, p_sparse: float, max_gap: int):
    """(latents [B, F, C, H, W], frame times [B, F]) of clips drawn from training seeds at random start frames."""
    lat, times = [], []
    for _ in range(batch):
        seed = int(torch.randint(len(TRAIN_SEEDS), (1,), generator=rng))
        start = int(torch.randint(0, 240, (1,), generator=rng))
        rel = frame_times(rng, n_blocks, fpb, p_sparse, max_gap)
        clip = make_clip(TRAIN_SEEDS[seed], rel[-1] + 1, start=start)
        lat.append(encode(clip.frames[rel]))
        times.append(torch.tensor(rel) + start)
    return torch.stack(lat), torch.stack(times)


def sample_sigma(rng: torch.Generator, shape, shift: float) -> torch.Tensor:
    """sigma = shift * u / (1 + (shift - 1) u), u ~ U(0, 1): every noise level, weighted as the sampler uses them."""
    u = torch.rand(shape, generator=rng)
    return shift * u / (1 + (shift - 1) * u)


def train(steps: int, batch: int = 4, clip_frames: int = 24, lr: float = 1e-3, seed: int = 0, shift: float = 2.0,
          p_sparse: float = 0.5, max_gap: int = 48, context_noise: float = 0.1, log_every: int = 50,
          progress: bool = True, checkpoint=None, checkpoint_every: int = 0) -> tuple[CausalWanModel, list[dict]]:
    from tqdm import tqdm

    torch.manual_seed(seed)
    cfg = PRESETS["world-tiny"]
    model = CausalWanModel(cfg)
    g = model.geometry
    fpb = g.frames_per_block
    if clip_frames % fpb:
        raise ValueError(f"clip_frames must be a multiple of {fpb}")
    n_blocks = clip_frames // fpb
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    lr_at = lambda i: lr * min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))  # noqa: E731
    rng = torch.Generator().manual_seed(seed + 1)
    prompt = torch.zeros(1, cfg.text_dim)
    curve = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc="train world model")
    for i in bar:
        x0, times = training_batch(rng, batch, n_blocks, fpb, p_sparse, max_gap)
        attn = _TeacherForcingAttention(batch, clip_frames, g.tokens_per_frame, fpb)
        prompts = [model.encode_prompt(prompt)] * batch
        # clean pass: the context as the cache holds it, lightly noised on half the blocks (robustness to
        # the model's own imperfect frames at inference, where the context is its own output)
        sig_c = sample_sigma(rng, (batch, n_blocks), 1.0) * context_noise
        sig_c = sig_c * (torch.rand(batch, n_blocks, generator=rng) < 0.5)
        sig_c = sig_c.repeat_interleave(fpb, dim=1)[..., None, None, None]
        ctx = (1 - sig_c) * x0 + sig_c * torch.randn(x0.shape, generator=rng)
        model.forward(ctx, sig_c[..., 0, 0, 0] * 1000, prompts, list(times), attn)  # fills attn.clean_kv
        sig = sample_sigma(rng, (batch, n_blocks), shift).repeat_interleave(fpb, dim=1)  # one level per block
        eps = torch.randn(x0.shape, generator=rng)
        xt = (1 - sig[..., None, None, None]) * x0 + sig[..., None, None, None] * eps
        attn.noisy = True
        flow = model.forward(xt, sig * 1000, prompts, list(times), attn)
        loss = F.mse_loss(flow, eps - x0)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i % log_every == 0 or i == steps - 1:
            curve.append({"step": i, "loss": loss.item(), "seconds": time.perf_counter() - t0})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
        if checkpoint and checkpoint_every and (i + 1) % checkpoint_every == 0:
            checkpoint(model, curve, i + 1)
    return model.eval(), curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ff-engine train-world", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--clip-frames", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--shift", type=float, default=2.0, help="noise-level shift of training and sampling")
    ap.add_argument("--p-sparse", type=float, default=0.5, help="share of clips with a distant-past chunk")
    ap.add_argument("--max-gap", type=int, default=48, help="largest gap (frames) between past chunk and recent")
    ap.add_argument("--context-noise", type=float, default=0.1, help="largest noise level of context augmentation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=250, help="write the checkpoint every N steps")
    ap.add_argument("--out", default=str(ASSETS / "world_model.safetensors"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = (f"ff-engine train-world --steps {a.steps} --batch {a.batch} --clip-frames {a.clip_frames} "
               f"--lr {a.lr} --shift {a.shift} --p-sparse {a.p_sparse} --max-gap {a.max_gap} "
               f"--context-noise {a.context_noise} --seed {a.seed}")

    def write(model, curve, step):
        model.cfg = model.cfg.with_(sample_shift=a.shift)
        save_checkpoint(model, out)
        meta = {"command": command, "step": step, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "curve": curve}
        out.with_suffix(".train.json").write_text(json.dumps(meta, indent=1))

    model, curve = train(a.steps, a.batch, a.clip_frames, a.lr, a.seed, a.shift, a.p_sparse, a.max_gap,
                         a.context_noise, checkpoint=write, checkpoint_every=a.checkpoint_every)
    write(model, curve, a.steps)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve])
        ax.set(xlabel="step", ylabel="flow-matching MSE", yscale="log", title="world model training loss")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".loss.png"), dpi=90)
    except Exception as exc:  # the curve is in the JSON either way
        print(f"(no plot: {exc})")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), loss {curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
