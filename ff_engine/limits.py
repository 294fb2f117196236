"""The physical limit per block: the yardstick every GPU figure of ff-engine will be compared with.

Arithmetic, not a measurement.  From a model's real shapes (its config and geometry) and a GPU's *published*
data-sheet figures (HBM bandwidth, dense bf16 tensor FLOP/s), for a stream whose cache holds ``budget`` latent
frames, one block costs at least

    * FLOPs: every forward pass of the block (``len(sample_steps)`` denoising passes plus the pass that writes the
      block's K/V to the cache) as the architecture states it (``Architecture.forward_flops``: the matmuls alone);
    * bytes: the cached K and V read once per layer per pass (pages rounded up), plus the weights read once per
      pass (shared by every stream of a batch);

so a block takes at least ``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` (the roofline), a stream is at most
``pixel frames per block / that`` fps, and a GPU can keep at most ``min(compute, bandwidth, memory)`` streams in
real time, where the compute and bandwidth bounds batch every stream's block into one pass over the weights and
the memory bound is what ``plan`` computes.  Left out, so the bounds stay bounds: the VAE decode, the text encoder,
norms and elementwise work, kernel launch and scheduling overhead, and any imperfect overlap of compute and
memory traffic.  Real figures will be slower; by how much is what a GPU run measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from ff_engine.engine.engine import stream_pages
from ff_engine.errors import ConfigError
from ff_engine.memory import kv_page_bytes


@dataclass(frozen=True)
class GpuSpec:
    """Data-sheet figures of one GPU (NVIDIA's published numbers, dense, no sparsity)."""

    name: str
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    bf16_flops: float  # dense tensor-core FLOP/s
    source: str


GPUS = {
    "H100": GpuSpec("H100 SXM5 80GB", 80 * 2**30, 3.35e12, 989.4e12,
                    "NVIDIA H100 Tensor Core GPU data sheet: 3.35 TB/s HBM3, 989.4 TFLOPS dense BF16 (SXM)"),
    "H200": GpuSpec("H200 SXM 141GB", 141 * 10**9, 4.8e12, 989.4e12,
                    "NVIDIA H200 Tensor Core GPU data sheet: 4.8 TB/s HBM3e, 989.4 TFLOPS dense BF16 (SXM)"),
}


def gpu(name: str) -> GpuSpec:
    if name not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; choose one of {sorted(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class BlockCost:
    """What one block of one stream costs at a cache of ``cached_tokens`` (the arithmetic behind ``limits``)."""

    passes: int
    query_tokens: int
    cached_tokens: int
    flops: int
    kv_bytes: int  # cached K/V read per block (all passes, all layers)
    weight_bytes: int  # weights read per block (all passes), shared by a batch


def block_cost(cfg, geometry, flops_per_pass, cached_tokens: int, page_size: int, dtype_bytes: int = 2,
               weight_bytes_per_pass: int = 0) -> BlockCost:
    """``flops_per_pass(query_tokens, cached_tokens)`` is the architecture's (``registry.forward_flops``)."""
    g = geometry
    passes = len(cfg.sample_steps) + 1  # the denoising passes and the cache-writing pass
    n = g.tokens_per_frame * g.frames_per_block
    pages = -(-cached_tokens // page_size)
    kv = passes * g.num_layers * pages * kv_page_bytes(page_size, g.num_kv_heads, g.head_dim, dtype_bytes)
    return BlockCost(passes, n, cached_tokens, passes * int(flops_per_pass(n, cached_tokens)), kv,
                     passes * weight_bytes_per_pass)


def stream_limits(cost: BlockCost, spec: GpuSpec, pixel_frames_per_block: int, fps: float) -> dict:
    """Lower bound on one stream's block time, upper bounds on its fps and on real-time streams per GPU (compute
    and bandwidth; the memory bound is the caller's)."""
    t_flops = cost.flops / spec.bf16_flops
    t_bytes = (cost.kv_bytes + cost.weight_bytes) / spec.hbm_bandwidth
    t_block = max(t_flops, t_bytes)
    real_time = pixel_frames_per_block / fps  # seconds of video one block is
    compute_streams = int(real_time * spec.bf16_flops // cost.flops)
    room = real_time * spec.hbm_bandwidth - cost.weight_bytes
    bandwidth_streams = int(room // cost.kv_bytes) if cost.kv_bytes else (10**9 if room > 0 else 0)
    return {"block_seconds_min": t_block, "bound_by": "compute" if t_flops >= t_bytes else "memory bandwidth",
            "compute_seconds": t_flops, "memory_seconds": t_bytes, "fps_max": pixel_frames_per_block / t_block,
            "real_time_streams_compute": compute_streams, "real_time_streams_bandwidth": max(0, bandwidth_streams)}


def limits(cfg, geometry, flops_per_pass, spec: GpuSpec, *, budgets: list[int | None], seconds: float,
           page_size: int = 32, dtype_bytes: int = 2, weight_bytes: int = 0) -> dict:
    """One row per budget (latent frames in the cache; None: unbounded, its cache averaged over a ``seconds``
    video, and its memory bound the whole video's cache)."""
    g = geometry
    frames = g.latent_frames(seconds)
    pixel_frames = g.frames_per_block * g.vae_stride[0]
    page = kv_page_bytes(page_size, g.num_kv_heads, g.head_dim, dtype_bytes)
    avail = max(0, int(spec.hbm_bytes * 0.9) - weight_bytes)  # as ``plan``: 10 % for activations / workspace
    rows = []
    for budget in budgets:
        if budget is not None and budget < g.frames_per_block:
            raise ConfigError(f"a budget must hold at least one block ({g.frames_per_block} frames), got {budget}")
        cached_frames = min(budget, frames) if budget is not None else frames / 2  # unbounded: its mean over the video
        cost = block_cost(cfg, g, flops_per_pass, int(cached_frames * g.tokens_per_frame), page_size, dtype_bytes,
                          weight_bytes)
        row = {"budget_frames": budget, "cached_tokens": cost.cached_tokens, "passes": cost.passes,
               "query_tokens": cost.query_tokens, "tflops_per_block": cost.flops / 1e12,
               "kv_gib_read_per_block": cost.kv_bytes / 2**30, "weight_gib_read_per_block": cost.weight_bytes / 2**30,
               **stream_limits(cost, spec, pixel_frames, g.fps)}
        row["memory_streams"] = avail // (stream_pages(g, page_size, frames, budget) * page)
        row["real_time_streams_max"] = min(row["real_time_streams_compute"], row["real_time_streams_bandwidth"],
                                           row["memory_streams"])
        rows.append(row)
    return {"gpu": spec.name, "source": spec.source, "hbm_bandwidth": spec.hbm_bandwidth,
            "bf16_flops": spec.bf16_flops, "seconds": seconds, "latent_frames": frames, "fps": g.fps,
            "pixel_frames_per_block": pixel_frames, "page_size": page_size, "rows": rows,
            "kind": "arithmetic from published data-sheet figures: lower bounds on time, upper bounds on fps and "
                    "streams; not a measurement"}
