"""Paged vs contiguous attention at Wan-like shapes, vLLM's CPU op vs the torch SDPA reference.

One 3-frame block of queries (12 heads x 128, 1560 tokens per latent frame) attends to a cache of N frames
plus itself.  For each cache length, side by side in one run:
  * torch-contiguous: SDPA over one contiguous [cache ; block] tensor (no paging at all);
  * torch-paged:      the torch reference backend (gathers the pages, then the same SDPA);
  * vllm-contiguous:  vLLM's CPU op with the session's pages at consecutive physical ids;
  * vllm-paged:       vLLM's CPU op with the pages scattered over the pool (a fragmented pool);
  * mirror-repack:    packing every cached token into vLLM's layout once (the worst case a compaction costs).
Ratios (paged / contiguous, vllm / torch) are what we report; absolute times depend on the machine.

    python benchmarks/attention.py            # Wan shapes (slow on 2 cores: ~2-4 min)
    python benchmarks/attention.py --quick    # 1/10 of the tokens per frame, for CI smoke
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.attention import AttentionBatch
from ff_engine.attention.torch_ref import TorchReferenceBackend, sdpa
from ff_engine.attention.vllm_cpu import VllmCpuBackend
from ff_engine.bench import RESULTS_DIR
from ff_engine.cache import PagedKVCache

RESULTS = RESULTS_DIR


def timeit(fn, repeats):
    fn()  # warm-up (mirror build, allocator)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def build(frames, tpf, heads, hd, ps, dtype, scatter, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = frames * tpf
    pages = math.ceil(n / ps)
    cache = PagedKVCache(1, heads, hd, ps, num_pages=2 * pages + 2, dtype=dtype)
    if scatter:  # two decoys take alternate pages; freeing one leaves every other page free (a fragmented pool)
        z = torch.zeros(ps, heads, hd, dtype=dtype)
        for d in ("d0", "d1"):
            cache.add_session(d, pages)
        for _ in range(pages):
            for d in ("d0", "d1"):
                cache.append(d, 0, z, z, torch.zeros(ps, 3, dtype=torch.int32))
        cache.release_session("d0")
    cache.add_session("s", pages)
    k = torch.randn(n, heads, hd, generator=g).to(dtype)
    v = torch.randn(n, heads, hd, generator=g).to(dtype)
    cache.append("s", 0, k, v, torch.zeros(n, 3, dtype=torch.int32))
    bt = cache.table("s", 0).pages
    contiguous_ids = bt == list(range(bt[0], bt[0] + len(bt)))
    return cache, k, v, contiguous_ids


def _parser() -> OneLineParser:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frames", type=int_arg(1), nargs="+", default=[3, 9, 21])
    ap.add_argument("--page-size", type=int_arg(1), default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int_arg(1), default=3)
    ap.add_argument("--out", default=str(RESULTS / "attention.json"))
    return ap


def _measure(a, frames, tpf, heads, hd, dtype, q, bk, bv, cu, scale) -> dict:
    """One ``--frames`` row: the cache with sequential and with scattered pages, every backend timed on each."""
    row = {"cache_frames": frames, "cache_tokens": frames * tpf}
    for scatter in (False, True):
        cache, k, v, contiguous_ids = build(frames, tpf, heads, hd, a.page_size, dtype, scatter)
        assert contiguous_ids != scatter
        batch = AttentionBatch(q, bk, bv, cu, cache.view(["s"], 0), scale)
        tag = "paged" if scatter else "contiguous"
        vb = VllmCpuBackend()
        row[f"vllm_{tag}_s"] = timeit(lambda: vb.forward(batch), a.repeats)
        if scatter:
            row["torch_paged_s"] = timeit(lambda: TorchReferenceBackend().forward(batch), a.repeats)
            mirror = vb.mirror(cache.storage)
            slots = cache.slots("s", 0)
            row["mirror_repack_s"] = timeit(lambda: mirror.on_write(cache.storage, slots), a.repeats)
            out_ref = TorchReferenceBackend().forward(batch)
            row["vllm_vs_torch_max_abs_err"] = float((vb.forward(batch) - out_ref).abs().max())
        else:
            kk, vv = torch.cat([k, bk]), torch.cat([v, bv])
            row["torch_contiguous_s"] = timeit(lambda: sdpa(q, kk, vv, scale, None), a.repeats)
        row["page_utilisation"] = cache.num_tokens("s", 0) / (len(cache.table("s", 0).pages) * a.page_size)
        cache = None  # free this cache before the next one is built
    row["torch_paged_over_contiguous"] = row["torch_paged_s"] / row["torch_contiguous_s"]
    row["vllm_paged_over_contiguous"] = row["vllm_paged_s"] / row["vllm_contiguous_s"]
    row["vllm_over_torch_sdpa"] = row["vllm_paged_s"] / row["torch_contiguous_s"]
    row["mirror_repack_over_attention"] = row["mirror_repack_s"] / row["vllm_paged_s"]
    return row


def _plot(rows, png, heads, hd, tpf, a) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["cache_frames"] for r in rows]
        for key, label in [("torch_contiguous_s", "torch SDPA, contiguous"), ("torch_paged_s", "torch ref, paged"),
                           ("vllm_contiguous_s", "vLLM CPU op, sequential pages"), ("vllm_paged_s", "vLLM CPU op, scattered pages")]:
            ax.plot(x, [r[key] for r in rows], marker="o", label=label)
        ax.set_xlabel("cached latent frames (+3-frame block)")
        ax.set_ylabel("seconds per attention call")
        ax.set_title(f"{heads}x{hd} heads, {tpf} tok/frame, {a.dtype}, page {a.page_size}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    except Exception as exc:  # noqa: BLE001 -- plotting is a convenience; the JSON is the result
        print(f"(no plot: {exc})")


def main(argv=None):
    a = _parser().parse_args(argv)
    dtype = getattr(torch, a.dtype)
    heads, hd = 12, 128
    tpf = 156 if a.quick else 1560
    block = 3 * tpf
    g = torch.Generator().manual_seed(1)
    q = torch.randn(block, heads, hd, generator=g).to(dtype)
    bk = torch.randn(block, heads, hd, generator=g).to(dtype)
    bv = torch.randn(block, heads, hd, generator=g).to(dtype)
    cu = torch.tensor([0, block], dtype=torch.int32)
    scale = 1 / math.sqrt(hd)
    rows = []
    for frames in a.frames:
        row = _measure(a, frames, tpf, heads, hd, dtype, q, bk, bv, cu, scale)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    result = {
        "benchmark": "attention", "quick": a.quick, "dtype": a.dtype, "page_size": a.page_size,
        "heads": heads, "head_dim": hd, "tokens_per_frame": tpf, "block_tokens": block,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__, "rows": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(rows, out.with_suffix(".png"), heads, hd, tpf, a)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
