"""Memory a device has available, and a check that refuses a size before it is allocated.

``ensure_fits`` raises ``BudgetError`` saying how much a request needs, how much the device has and how many
units of it fit, so an oversized ``num_pages`` / ``page_size`` / budget is a one-line error in milliseconds
instead of a ``MemoryError`` after a minute (or the host's OOM killer).  A request may use at most
``1 - RESERVE_FRACTION`` of what is available: the rest is left for activations and workspace, as ``plan``
assumes.

Host memory is psutil's ``available`` (what the kernel can hand out without swapping), capped by the cgroup
(container) limit, which psutil does not read: a container's limit is what the OOM killer enforces.  CUDA memory
is the driver's free memory plus what torch's caching allocator holds but does not use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ff_engine.errors import BudgetError

#: share of the available memory a single request may not take (activations, workspace, other streams' scratch)
RESERVE_FRACTION = 0.1

#: bytes of host bookkeeping per page besides the tensors: vLLM's ``KVCacheBlock`` object, its free-queue links
#: and ``PagePool``'s id -> block dict (measured ~1.25 KB on CPython 3.11, vLLM 0.32; ``tests/test_cli_inputs.py``
#: checks the estimate still covers it)
PAGE_BOOKKEEPING_BYTES = 1536

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit, or None without a limit."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" / v1's huge sentinel mean no limit
            return max(0, int(limit) - usage)
    return None


def host_available_bytes() -> int:
    """Host memory that can be allocated now without swapping (cgroup limit included)."""
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with vLLM; without it, what POSIX reports as free
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cg = _cgroup_headroom()
    return avail if cg is None else min(avail, cg)


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory that can be allocated on ``device`` now (``meta``: unlimited)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type == "meta":
        return 2**62
    return host_available_bytes()


def usable_bytes(device: str | torch.device = "cpu") -> int:
    """What one request may take: the available memory less ``RESERVE_FRACTION``."""
    return int(available_bytes(device) * (1 - RESERVE_FRACTION))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, three significant digits)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def kv_page_bytes(page_size: int, num_kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """K and V of one page: the one formula every estimate of pages per stream or pages per pool builds on (the
    cache, the capacity plan, the CLI's packed-mirror page, the device check)."""
    return 2 * page_size * num_kv_heads * head_dim * element_bytes


def cache_page_bytes(page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Every byte one page of ``PagedKVCache`` costs: K and V, token metadata (positions int32 x 3, log-mass
    float32), the per-page summaries (valid count, log mass, centroid and radius per kv head, epoch) and the
    pool's bookkeeping.  ``tests/test_cli_inputs.py`` checks this against a real cache's tensors, so a new
    per-page tensor cannot go unaccounted.  (Future Forcing's scorer keeps its page importance itself: 20 bytes
    per page of the pool per stream that ranks pages.)"""
    kv = kv_page_bytes(page_size, num_kv_heads, head_dim, torch.empty((), dtype=dtype).element_size())
    tokens = page_size * (3 * 4 + 4)
    summaries = 4 + 4 + num_kv_heads * head_dim * 4 + num_kv_heads * 4 + 8
    return kv + tokens + summaries + PAGE_BOOKKEEPING_BYTES


def ensure_fits(
    what: str, count: int, unit_bytes: int, unit: str, device: str | torch.device = "cpu", fixed_bytes: int = 0
) -> None:
    """Raise ``BudgetError`` unless ``fixed_bytes + count * unit_bytes`` fits in ``usable_bytes(device)``; the
    message names ``what`` was asked for and how many ``unit``s fit (with ``fixed_bytes`` already taken)."""
    need = fixed_bytes + count * unit_bytes
    usable = usable_bytes(device)
    if need <= usable:
        return
    fit = max(0, (usable - fixed_bytes) // unit_bytes) if unit_bytes > 0 else 0
    dev = torch.device(device)
    raise BudgetError(
        f"{what} needs {format_bytes(need)} but {dev} has {format_bytes(usable)} usable "
        f"({format_bytes(available_bytes(dev))} available, {math.floor(RESERVE_FRACTION * 100)} % kept back): "
        f"at most {fit} {unit} fit"
    )


def check_cache_fits(
    num_pages, page_size, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device
) -> None:
    """``PagedKVCache``'s check before it allocates: ``num_pages`` (+ vLLM's null page) of ``page_size`` tokens.
    Values of the wrong type are left to the cache's own validation."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (num_pages, page_size)):
        return
    page = cache_page_bytes(page_size, num_kv_heads, head_dim, dtype)
    ensure_fits(
        f"num_pages {num_pages} of page_size {page_size}",
        num_pages,
        page,
        f"pages of {page_size} tokens",
        device,
        fixed_bytes=page,
    )  # + vLLM's null page 0
