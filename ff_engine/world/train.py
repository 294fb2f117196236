"""Train the in-repo world model: few-step flow matching with teacher forcing, block-causal, on CPU.

For a batch of clips of ``clip_frames`` frames (blocks of 3):
  1. a clean pass (t = 0) over the whole clip with a block-causal mask produces every block's K/V — exactly
     what inference writes into the cache;
  2. a noisy pass: each block gets its own timestep drawn from the inference schedule's four warped steps and
     is noised as x_t = (1 - sigma) x0 + sigma eps; its queries attend to the clean K/V of earlier blocks and
     to itself (no mask inside the block), as at inference;
  3. the loss is the MSE between the predicted flow and eps - x0.
Gradients flow through both passes (CausVid-style teacher forcing).  Everything is seeded: the same command
reproduces the same checkpoint on the same software.

    ff-engine train-world --steps 3000 --out ff_engine/world/assets/world_model.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ff_engine.engine.schedule import FlowMatchSchedule
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


def batch_latents(seeds: list[int], starts: list[int], frames: int) -> torch.Tensor:
    return torch.stack([encode(make_clip(s, frames, start=t).frames) for s, t in zip(seeds, starts)])


def train(steps: int, batch: int = 8, clip_frames: int = 12, lr: float = 3e-4, seed: int = 0,
          log_every: int = 50, progress: bool = True) -> tuple[CausalWanModel, list[dict]]:
    from tqdm import tqdm

    torch.manual_seed(seed)
    cfg = PRESETS["world-tiny"]
    model = CausalWanModel(cfg)
    g = model.geometry
    sched = FlowMatchSchedule()
    steps_t = sched.denoising_timesteps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    lr_at = lambda i: lr * min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))  # noqa: E731
    rng = torch.Generator().manual_seed(seed + 1)
    prompt = torch.zeros(1, cfg.text_dim)
    curve = []
    t0 = time.perf_counter()
    n_blocks = clip_frames // g.frames_per_block
    bar = tqdm(range(steps), disable=not progress, desc="train world model")
    for i in bar:
        seeds = torch.randint(len(TRAIN_SEEDS), (batch,), generator=rng).tolist()
        starts = torch.randint(0, 240, (batch,), generator=rng).tolist()
        x0 = batch_latents(seeds, starts, clip_frames)  # [B, F, C, H, W]
        attn = _TeacherForcingAttention(batch, clip_frames, g.tokens_per_frame, g.frames_per_block)
        ps = model.encode_prompt(prompt)
        prompts = [ps] * batch
        zeros = torch.zeros(batch, clip_frames)
        model.forward(x0, zeros, prompts, [0] * batch, attn)  # clean pass: fills attn.clean_kv
        idx = torch.randint(len(steps_t), (batch, n_blocks), generator=rng)
        t = steps_t[idx].repeat_interleave(g.frames_per_block, dim=1)  # [B, F], one timestep per block
        eps = torch.randn(x0.shape, generator=rng)
        sig = sched.sigma(t)[..., None, None, None]
        xt = (1 - sig) * x0 + sig * eps
        attn.noisy = True
        flow = model.forward(xt, t, prompts, [0] * batch, attn)
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
    return model.eval(), curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ff-engine train-world", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip-frames", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ASSETS / "world_model.safetensors"))
    a = ap.parse_args(argv)
    model, curve = train(a.steps, a.batch, a.clip_frames, a.lr, a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out)
    meta = {"command": f"ff-engine train-world --steps {a.steps} --batch {a.batch} --clip-frames {a.clip_frames} "
                       f"--lr {a.lr} --seed {a.seed}", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "curve": curve}
    out.with_suffix(".train.json").write_text(json.dumps(meta, indent=1))
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
