"""Kernel benchmarks for the GPU path (``ff-engine bench kernels``), side by side in one run.

Shapes: one 3-frame block of queries (12 heads x 128, 1560 tokens per latent frame = Wan 480x832) against N cached
frames; bf16 on CUDA (fp32 elsewhere).  Three measurements:

  A. paged vs contiguous, same backend: the ``flex`` backend over the session's pages scattered across a
     fragmented pool (two ``flex_attention`` calls, LSE-combined) against one ``flex_attention`` call over the
     same tokens as one contiguous [cache ; block] tensor; torch SDPA over the contiguous tensor as a yardstick.
  B. biased vs unbiased: the cache part with the log-mass ``score_mod`` against the same call without it.
  C. scoring throughput: the fused Triton scoring kernel over one layer's 21-frame cache and over 30 layers in one
     launch (the batched form), bytes it must read (keys, values, slots, log-mass) per second as a share of the
     card's measured copy bandwidth (and of its data-sheet bandwidth where the card is known); the torch reference
     on the same input; the compaction copy kernel against torch indexing.

Medians of ``--repeats`` timed calls after a warm-up call (which compiles).  Ratios are the result; seconds depend
on the card.  ``--tiny`` runs the same code at toy sizes (CPU: eager FlexAttention, Triton's interpreter) -- the
CI rehearsal of ``benchmarks/device_check.py``.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels_<card>.json
    python benchmarks/kernel_bench.py --tiny --out /tmp/kernels.json

(Not ``benchmarks/kernels.py``: run as a script, that name would shadow the ``kernels`` package for every script in
this folder.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ff_engine.attention import AttentionBatch
from ff_engine.attention.flex import FlexAttentionBackend, flex_call
from ff_engine.bench import RESULTS_DIR
from ff_engine.cache import PagedKVCache
from kernels import compaction_ref, proxy_factors, scoring_ref

RESULTS = RESULTS_DIR
#: data-sheet HBM bandwidth (bytes/s) by a substring of the device name; the measured copy bandwidth is the main
#: yardstick
DATASHEET_BW = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                "H100 NVL": 3.9e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100-PCIE": 1.935e12,
                "L40S": 0.864e12}

FULL = {"heads": 12, "head_dim": 128, "tokens_per_frame": 1560, "block_frames": 3, "cached_frames": [3, 9, 21],
        "page_sizes": [32, 128], "layers": 30, "repeats": 5}
TINY = {"heads": 2, "head_dim": 64, "tokens_per_frame": 24, "block_frames": 3, "cached_frames": [3],
        "page_sizes": [16], "layers": 2, "repeats": 0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (which compiles); ``repeats`` 0: the warm-up's."""
    def once():
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    first = once()
    return first if repeats == 0 else statistics.median(once() for _ in range(repeats))


def scattered_cache(n_tokens, heads, head_dim, ps, dtype, device, g, log_mass=False):
    """One session holding ``n_tokens`` in pages interleaved with a decoy's (a fragmented pool)."""
    pages = math.ceil(n_tokens / ps)
    cache = PagedKVCache(1, heads, head_dim, ps, num_pages=2 * pages + 2, dtype=dtype, device=device)
    cache.add_session("decoy", pages)
    cache.add_session("s", pages)
    k = torch.randn(n_tokens, heads, head_dim, generator=g, device=device).to(dtype)
    v = torch.randn(n_tokens, heads, head_dim, generator=g, device=device).to(dtype)
    lm = torch.rand(n_tokens, generator=g, device=device) * 0.7 if log_mass else None
    zero = torch.zeros(ps, heads, head_dim, dtype=dtype, device=device)
    pos = torch.zeros(ps, 3, dtype=torch.int32)
    for start in range(0, n_tokens, ps):
        stop = min(start + ps, n_tokens)
        cache.append("s", 0, k[start:stop], v[start:stop], pos[: stop - start], None if lm is None else lm[start:stop])
        cache.append("decoy", 0, zero, zero, pos)
    return cache, k, v, lm


def attention_row(s, ps, frames, device, dtype, g) -> dict:
    """A and B for one page size and cache length."""
    h, d, nq = s["heads"], s["head_dim"], s["tokens_per_frame"] * s["block_frames"]
    scale, n, reps = 1 / math.sqrt(d), frames * s["tokens_per_frame"], s["repeats"]
    cache, ck, cv, _ = scattered_cache(n, h, d, ps, dtype, device, g)
    q, k, v = (torch.randn(nq, h, d, generator=g, device=device).to(dtype) for _ in range(3))
    batch = AttentionBatch(q, k, v, torch.tensor([0, nq], dtype=torch.int32, device=device), cache.view(["s"], 0),
                           scale)
    biased, unbiased = FlexAttentionBackend(bias=True), FlexAttentionBackend(bias=False)
    kk, vv = torch.cat([ck, k]).transpose(0, 1)[None], torch.cat([cv, v]).transpose(0, 1)[None]
    q4, lm_all = q.transpose(0, 1)[None], torch.zeros(n + nq, device=device)

    def contiguous_flex():  # the same tokens as one contiguous tensor, the same log-mass score_mod, no block mask
        return flex_call(q4, kk, vv, None, scale, lambda sc, b, hh, qi, ki: sc + lm_all[ki], device.type == "cuda")

    row = {"page_size": ps, "cached_frames": frames, "cache_tokens": n, "queries": nq,
           "flex_paged_s": timed(lambda: biased.forward(batch), device, reps),
           "flex_contiguous_s": timed(contiguous_flex, device, reps),
           "sdpa_contiguous_s": timed(lambda: F.scaled_dot_product_attention(q4, kk, vv, scale=scale), device, reps),
           "cache_part_biased_s": timed(lambda: biased.cache_part(batch), device, reps),
           "cache_part_unbiased_s": timed(lambda: unbiased.cache_part(batch), device, reps)}
    ref = F.scaled_dot_product_attention(q4.float(), kk.float(), vv.float(), scale=scale)[0].transpose(0, 1)
    row["max_abs_err_vs_sdpa_fp32"] = float((biased.forward(batch).float() - ref).abs().max())
    row["paged_over_contiguous"] = row["flex_paged_s"] / row["flex_contiguous_s"]
    row["biased_over_unbiased"] = row["cache_part_biased_s"] / row["cache_part_unbiased_s"]
    return row


def copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    """Measured device copy bandwidth (read + write bytes per second) of a ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeats)


def scoring_row(s, layers, per_layer, device, dtype, g, copy_bw, sheet_bw) -> dict:
    """C for ``layers`` segments of ``per_layer`` tokens in one launch: kernel vs torch reference, bandwidth share."""
    from kernels import scoring_triton

    h, d, r, n = s["heads"], s["head_dim"], 16, layers * per_layer
    kc = torch.randn(n, h, d, generator=g, device=device).to(dtype)
    vc = torch.randn(n, h, d, generator=g, device=device).to(dtype)
    a = torch.randn(layers, 1, h, d, d, generator=g, device=device, dtype=torch.float64) / d
    u, lam = proxy_factors(a @ a.transpose(-1, -2), r)
    mu = torch.randn(layers, 1, h, d, generator=g, device=device) * 0.3
    args = (kc, vc, torch.zeros(n, device=device), torch.randperm(n, generator=g, device=device),
            torch.arange(layers + 1, device=device) * per_layer, mu, u, lam, True, "mean")
    t_kernel = timed(lambda: scoring_triton.expected_attention_scores(*args), device, s["repeats"])
    t_ref = timed(lambda: scoring_ref.expected_attention_scores(*args), device, s["repeats"] // 2)
    got, want = scoring_triton.expected_attention_scores(*args), scoring_ref.expected_attention_scores(*args)
    moved = n * (2 * h * d * kc.element_size() + 8 + 4) + n * h * 4  # K, V, slot, log-mass in; logits out
    return {"layers": layers, "tokens": n, "kernel_s": t_kernel, "torch_ref_s": t_ref,
            "speedup_vs_torch": t_ref / t_kernel, "bytes": moved, "achieved_Bps": moved / t_kernel,
            "share_of_copy_bandwidth": moved / t_kernel / copy_bw,
            "share_of_datasheet_bandwidth": None if sheet_bw is None else moved / t_kernel / sheet_bw,
            "max_abs_logit_err": float((got[0] - want[0]).abs().max()),
            "max_rel_importance_err": float(((got[2] - want[2]).abs() / want[2].abs().clamp_min(1e-30)).max())}


def compaction_row(s, device, dtype, g) -> dict:
    """The compaction copy of one block's worth of holes: Triton kernel vs torch indexing."""
    from kernels import compaction_triton

    h, d, m = s["heads"], s["head_dim"], s["tokens_per_frame"] * s["block_frames"]
    kc, vc = (torch.randn(8 * m, h, d, generator=g, device=device).to(dtype) for _ in range(2))
    pos, lm = torch.zeros(8 * m, 3, dtype=torch.int32, device=device), torch.zeros(8 * m, device=device)
    perm = torch.randperm(8 * m, generator=g, device=device)
    src, dst = perm[:m], perm[m:2 * m]
    return {"rows": m,
            "triton_s": timed(lambda: compaction_triton.move_slots(kc, vc, pos, lm, src, dst), device, s["repeats"]),
            "torch_s": timed(lambda: compaction_ref.move_slots(kc, vc, pos, lm, src, dst), device, s["repeats"])}


def _show(row: dict) -> None:
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU rehearsal)")
    ap.add_argument("--only", nargs="+", choices=["attention", "scoring"], default=["attention", "scoring"])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = TINY if a.tiny else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    result = {"benchmark": "kernels", "device": name, "tiny": a.tiny, "dtype": str(dtype), "sizes": s,
              "torch": torch.__version__}
    out = Path(a.out or RESULTS / f"kernels_{name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every row: a run cut short keeps what it measured
        out.write_text(json.dumps(result, indent=1))

    if "scoring" in a.only:
        copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 20), s["repeats"])
        sheet = next((bw for key, bw in DATASHEET_BW.items() if key in name), None)
        sc = result["scoring"] = {"copy_bandwidth_Bps": copy_bw, "datasheet_bandwidth_Bps": sheet}
        per_layer = (21 if device.type == "cuda" else 2) * s["tokens_per_frame"]
        for layers in (1, s["layers"]):
            sc[f"scoring_{layers}_layers"] = scoring_row(s, layers, per_layer, device, dtype, g, copy_bw, sheet)
            _show(sc[f"scoring_{layers}_layers"])
            save()
        sc["compaction"] = compaction_row(s, device, dtype, g)
        _show(sc["compaction"])
        save()
    if "attention" in a.only:
        result["attention"] = []
        for ps in s["page_sizes"]:
            for frames in s["cached_frames"]:
                result["attention"].append(attention_row(s, ps, frames, device, dtype, g))
                _show(result["attention"][-1])
                save()
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
