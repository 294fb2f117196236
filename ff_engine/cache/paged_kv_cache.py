"""The paged video KV cache: canonical physical storage, per-(session, layer) page tables, token metadata.

Physical storage (one tensor each, shared by every layer and session, indexed by page id):
  * ``key_cache``, ``value_cache``: ``[num_pages + 1, page_size, kv_heads, head_dim]``, the plain layout that
    flash-attn's paged path reads directly and that policies read and rewrite in place.  Keys are stored
    post-RoPE, as the model attends to them.
  * ``positions``: ``[num_pages + 1, page_size, 3]`` int32 (latent frame, h, w) of every token, so policies
    can protect sink frames or the newest block and re-derive RoPE phases.
  * ``log_mass``: ``[num_pages + 1, page_size]`` float32; 0 for an original token, ``log m`` for a token
    that stands for ``m`` merged originals (attention adds it as a per-key bias).

A page belongs to one (session, layer) at a time, so layers of one session may keep different tokens and
trade pages between them while the session's total stays under its reservation.

Invariants of every ``LayerPageTable`` (checked by ``check_invariants``):
  * tokens are dense: token ``i`` of a layer lives in slot ``i % page_size`` of page ``pages[i // page_size]``;
    every page is full except possibly the last, and ``len(pages) == ceil(num_tokens / page_size)``.
  * token order inside a table is *not* time order: attention over the cache has no mask, so compaction may
    permute survivors (it fills holes from the tail); a token's latent frame is in ``positions``.
Other layers see the cache through narrow views only: an attention backend through a per-call ``CacheView`` (block
table, lengths, the shared ``KVStorage``), a cache policy through a ``SessionCacheView`` of one (session, layer),
which reads tokens and summaries and asks the cache to merge or keep tokens.
Every write into physical storage is reported to registered ``StorageListener``s (e.g. the packed mirror of
vLLM's CPU attention op), so derived layouts never go stale.

Isolation between streams (enforced here, checked by ``check_invariants``): every slot of physical storage that
holds no live token is all-zero (keys, values, positions, log-mass), the null page 0 included.  Pages are
scrubbed in ``_free_pages``, the one place a page leaves a table, *before* they go back to vLLM's pool, and the
listeners are told (``on_free``) so derived copies forget them too; compaction zeroes the slots it vacates in a
kept page.  So a page reaches its next owner in one defined state whatever its last owner wrote (NaN included),
and a kernel that reads a whole page or tile past ``seq_len`` and masks afterwards (``NaN * 0 = NaN``) only
ever sees finite zeros there.  Summaries mask by selection, never by multiplication, for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ff_engine.cache.page_pool import PagePool
from ff_engine.cache.page_summaries import PageSummaries
from ff_engine.errors import BudgetError, ConfigError
from ff_engine.memory import check_cache_fits, kv_page_bytes
from kernels import move_slots, write_slots


class StorageListener(Protocol):
    """A derived layout of the physical storage (vLLM CPU's packed mirror): told of every write and free."""

    def on_write(self, storage: KVStorage, slots: torch.Tensor) -> None:
        """``slots`` (int64, flat ``page * page_size + offset``) were (re)written in the canonical storage."""

    def on_free(self, storage: KVStorage, pages: list[int]) -> None:
        """``pages`` were scrubbed to zero and are going back to the pool: derived copies must clear them."""

    def check_invariants(self, storage: KVStorage) -> None:
        """Assert the derived layout holds nothing of pages that hold no live token (``storage.live_slots()``;
        called by the cache's check)."""


@dataclass(eq=False)
class KVStorage:
    """The physical storage shared by every layer and session, without page tables or sessions: what attention
    backends read and derived layouts mirror.  The tensors are the cache's own (no copy); only the cache writes
    them, and it reports every write to ``listeners``."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    positions: torch.Tensor
    log_mass: torch.Tensor
    listeners: list[StorageListener]
    #: pages some table holds now (a derived layout built late copies them once)
    held_pages: Callable[[], list[int]]
    #: bool ``[num_pages + 1, page_size]``: slots holding a live token (O(storage): invariant checks only)
    live_slots: Callable[[], torch.Tensor]

    @property
    def page_size(self) -> int:
        return self.key_cache.shape[1]

    @property
    def num_pages(self) -> int:
        return self.key_cache.shape[0] - 1

    @property
    def num_kv_heads(self) -> int:
        return self.key_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.key_cache.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.key_cache.dtype

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)


@dataclass
class LayerPageTable:
    """Pages of one layer of one session, in token order."""

    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0


@dataclass
class CacheView:
    """What an attention backend sees of the cache for one call (one layer, a batch of sessions), in vLLM's
    format: int32 ``block_table`` ``[num_seqs, max_pages]`` padded with the null page 0, int32 ``seq_lens``, and the
    shared storage they index.  Like vLLM v1's ``KVCacheBlocks``, it is a narrow type: a backend never holds the
    multi-tenant cache, so it cannot reach another stream's table or change one."""

    storage: KVStorage
    session_ids: list[str]
    layer: int
    block_table: torch.Tensor
    seq_lens: torch.Tensor

    @property
    def key_cache(self) -> torch.Tensor:
        return self.storage.key_cache

    @property
    def value_cache(self) -> torch.Tensor:
        return self.storage.value_cache

    @property
    def log_mass(self) -> torch.Tensor:
        """``[num_pages + 1, page_size]``: the per-key bias (log of the originals a merged token stands for)."""
        return self.storage.log_mass

    @property
    def page_size(self) -> int:
        return self.storage.page_size

    def pages_for(self, num_tokens: int) -> int:
        return self.storage.pages_for(num_tokens)

    def slots(self, i: int) -> torch.Tensor:
        """Flat slot ids of sequence ``i``'s tokens, in order."""
        n, ps = int(self.seq_lens[i]), self.page_size
        pages = self.block_table[i, : self.pages_for(n)].to(torch.int64)
        offs = torch.arange(ps, device=pages.device)
        return (pages[:, None] * ps + offs[None, :]).reshape(-1)[:n]

    def bias(self, i: int) -> torch.Tensor:
        """Sequence ``i``'s per-key bias (log-mass), in token order."""
        return self.log_mass.view(-1)[self.slots(i)]

    def has_bias(self) -> bool:
        return any(bool((self.bias(i) != 0).any()) for i in range(len(self.session_ids)))


class SessionCacheView:
    """One (session, layer) of the cache as a cache policy sees it: it reads that layer's tokens (keys, values,
    positions, log-mass) and page summaries, and *requests* changes — merge tokens in place, keep a subset — that
    the cache applies (with its bookkeeping: summaries, listeners, the pool).  A policy never holds the
    multi-tenant cache, so it cannot read or change another stream's pages."""

    def __init__(self, cache: PagedKVCache, session_id: str, layer: int):
        cache.table(session_id, layer)  # unknown session / layer: the cache's error, at once
        self._cache, self.session_id, self.layer = cache, session_id, layer
        self.page_size, self.num_kv_heads, self.head_dim = cache.page_size, cache.num_kv_heads, cache.head_dim
        self.device, self.dtype, self.num_pages = cache.device, cache.dtype, cache.num_pages

    @property
    def num_tokens(self) -> int:
        return self._cache.num_tokens(self.session_id, self.layer)

    @property
    def num_layers(self) -> int:
        return self._cache.num_layers

    def other_layer(self, layer: int) -> SessionCacheView:
        """The same session's view of another layer (a policy that scores every layer by one of them reads it:
        forcing-kv's ``score_layer``)."""
        return SessionCacheView(self._cache, self.session_id, layer)

    def slots(self) -> torch.Tensor:
        """Flat storage slots of the layer's tokens, in table order (the ids ``read`` and ``flat`` take)."""
        return self._cache.slots(self.session_id, self.layer)

    def flat(self, name: str) -> torch.Tensor:
        """Storage ``name`` (key_cache, value_cache, positions, log_mass) viewed per slot; for reading the slots of
        this layer in place (the fused scoring kernel): ``[slots, Hkv, D]``, ``[slots, 3]`` or ``[slots]``."""
        c = self._cache
        tail = {"key_cache": (c.num_kv_heads, c.head_dim), "value_cache": (c.num_kv_heads, c.head_dim),
                "positions": (3,), "log_mass": ()}[name]
        return getattr(c, name).view(-1, *tail)

    def read(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        """Copies of storage ``name`` at ``slots`` (which must be this layer's)."""
        return self.flat(name)[slots]

    def gather(self) -> dict[str, torch.Tensor]:
        return self._cache.gather(self.session_id, self.layer)

    def page_summaries(self) -> dict[str, torch.Tensor]:
        """The layer's page summaries in table order (``PagedKVCache.page_summaries``; the first request makes the
        cache keep them)."""
        return self._cache.page_summaries(self.session_id, self.layer)

    def merge(self, token_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_mass: torch.Tensor) -> None:
        """Rewrite tokens ``token_idx`` (table indices) in place: the merge half of merge-in-place."""
        self._cache.update(self.session_id, self.layer, token_idx, k, v, log_mass)

    def keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Evict every token but ``keep`` (increasing table indices); returns the survivors' old indices in their
        new order (``PagedKVCache.compact``)."""
        return self._cache.compact(self.session_id, self.layer, keep)


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        num_pages: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {val!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ConfigError(f"page_size must be an integer >= 1, got {page_size!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, torch.device(device)
        check_cache_fits(num_pages, page_size, num_kv_heads, head_dim, dtype, self.device)  # before allocating
        self.pool = PagePool(num_pages)
        shape = (num_pages + 1, page_size, num_kv_heads, head_dim)
        self.listeners: list[StorageListener] = []
        self.storage = KVStorage(
            torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device),
            torch.zeros((num_pages + 1, page_size, 3), dtype=torch.int32, device=self.device),
            torch.zeros((num_pages + 1, page_size), dtype=torch.float32, device=self.device),
            self.listeners, self._held_pages, self.live_slots)
        # Per-page summaries, kept current on every append / update / compaction (``page_summaries``).  Eager, not
        # started on a policy's first request: seeding them later would reduce over other sets of pages at once
        # than the incremental refreshes do, and a float32 reduction of another shape may differ in the last bit,
        # which page candidates and merge tolerances could turn into other survivors (not worth the bit-identity).
        self.summaries = PageSummaries(self.storage)
        self._tables: dict[str, list[LayerPageTable]] = {}

    # ---- storage (owned by ``storage``, the one object backends and listeners see) ---------------------------
    key_cache = property(lambda self: self.storage.key_cache, lambda self, t: setattr(self.storage, "key_cache", t))
    value_cache = property(lambda self: self.storage.value_cache,
                           lambda self, t: setattr(self.storage, "value_cache", t))
    positions = property(lambda self: self.storage.positions, lambda self, t: setattr(self.storage, "positions", t))
    log_mass = property(lambda self: self.storage.log_mass, lambda self, t: setattr(self.storage, "log_mass", t))

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.capacity

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def bytes_per_page(self) -> int:
        return kv_page_bytes(self.page_size, self.num_kv_heads, self.head_dim, self.key_cache.element_size())

    # ---- sessions -------------------------------------------------------------------------------
    def add_session(self, session_id: str, reserve_pages: int) -> None:
        self.pool.reserve(session_id, reserve_pages)
        self._tables[session_id] = [LayerPageTable() for _ in range(self.num_layers)]

    def release_session(self, session_id: str) -> None:
        """Scrub and return every page of the session to vLLM's pool (finish or cancel). Idempotent.

        The pool's record of ownership, not the page tables, says what to scrub and free: ``release_session`` is
        the cleanup path, and it runs after a mutation that an asynchronous exception (Ctrl-C lands between any
        two bytecodes) cut short between updating a table and telling the pool.  Trusting the tables there would
        crash the cleanup or leak pages; the pool's set is always a superset of what the tables list."""
        self._tables.pop(session_id, None)
        private = [p for p in self.pool.held_pages(session_id) if self.pool.refs(p) == 1]
        if private:  # pages a fork still holds stay as they are: the fork reads them
            self._free_pages(private)
        self.pool.release(session_id)

    def fork_session(self, source_id: str, fork_id: str) -> None:
        """Give session ``fork_id`` (admitted, empty) exactly ``source_id``'s tokens by sharing its pages
        (copy-on-write: vLLM's reference counts say who holds a page; ``_private`` copies a shared page before
        either stream writes, compacts or merges into it).  The pages count against the fork's reservation as
        against the source's, so each can still reach its whole budget alone."""
        src = [self.table(source_id, layer) for layer in range(self.num_layers)]
        dst = [self.table(fork_id, layer) for layer in range(self.num_layers)]
        if any(t.num_tokens or t.pages for t in dst):
            raise ConfigError(f"fork_session needs an empty session; {fork_id!r} has tokens")
        pages = [p for t in src for p in t.pages]
        self.pool.share(fork_id, pages)  # BudgetError before anything changes
        for s_t, d_t in zip(src, dst, strict=True):
            d_t.pages, d_t.num_tokens = list(s_t.pages), s_t.num_tokens

    def shared_pages(self, session_id: str) -> int:
        """How many of the session's pages another session also holds (copy-on-write pending)."""
        return sum(self.pool.refs(p) > 1 for p in self.pool.held_pages(session_id))

    def _private(self, session_id: str, layer: int, page_positions) -> None:
        """Copy-on-write: before a write into the table's pages at ``page_positions``, give each one another
        session also holds a private copy (the reference to the shared page is dropped first, so the copy fits
        the reservation the shared page counted against)."""
        t = self.table(session_id, layer)
        for j in sorted(set(page_positions)):
            if not 0 <= j < len(t.pages) or self.pool.refs(t.pages[j]) == 1:
                continue
            old = t.pages[j]
            self.pool.free(session_id, [old])  # still held by the other session: not scrubbed, not free
            (new,) = self.pool.allocate(session_id, 1)
            for storage in (self.key_cache, self.value_cache, self.positions, self.log_mass):
                storage[new] = storage[old]
            t.pages[j] = new
            for listener in self.listeners:
                listener.on_write(self.storage, new * self.page_size + torch.arange(self.page_size, device=self.device))
            self._refresh_pages(t, [j])

    def _drop_pages(self, session_id: str, pages: list[int]) -> None:
        """The session gives up ``pages``: scrub those it alone holds (they go back to the pool), drop its
        reference to shared ones (another stream still reads them)."""
        private = [p for p in pages if self.pool.refs(p) == 1]
        if private:
            self._free_pages(private)
        self.pool.free(session_id, pages)

    def _held_pages(self) -> list[int]:
        return [p for tables in self._tables.values() for t in tables for p in t.pages]

    def has_session(self, session_id: str) -> bool:
        return session_id in self._tables

    def table(self, session_id: str, layer: int) -> LayerPageTable:
        try:
            tables = self._tables[session_id]
        except KeyError:
            raise BudgetError(f"unknown session {session_id!r}") from None
        if not 0 <= layer < self.num_layers:
            raise ConfigError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return tables[layer]

    def num_tokens(self, session_id: str, layer: int) -> int:
        return self.table(session_id, layer).num_tokens

    def pages_held(self, session_id: str) -> int:
        return self.pool.held(session_id)

    # ---- addressing -----------------------------------------------------------------------------
    def slots(self, session_id: str, layer: int) -> torch.Tensor:
        t = self.table(session_id, layer)
        pages = torch.tensor(t.pages, dtype=torch.int64, device=self.device)
        offs = torch.arange(self.page_size, device=self.device)
        return (pages[:, None] * self.page_size + offs[None, :]).reshape(-1)[: t.num_tokens]

    def view(self, session_ids: list[str], layer: int) -> CacheView:
        tables = [self.table(s, layer) for s in session_ids]
        max_pages = max([len(t.pages) for t in tables] + [1])
        bt = torch.zeros((len(tables), max_pages), dtype=torch.int32)
        for i, t in enumerate(tables):
            if t.pages:
                bt[i, : len(t.pages)] = torch.tensor(t.pages, dtype=torch.int32)
        seq = torch.tensor([t.num_tokens for t in tables], dtype=torch.int32)
        return CacheView(self.storage, list(session_ids), layer, bt.to(self.device), seq.to(self.device))

    def session_view(self, session_id: str, layer: int) -> SessionCacheView:
        """What a cache policy may see and ask of one layer of one session."""
        return SessionCacheView(self, session_id, layer)

    # ---- writes ---------------------------------------------------------------------------------
    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, name: str = "k/v") -> None:
        want = (self.num_kv_heads, self.head_dim)
        if k.dim() != 3 or tuple(k.shape[1:]) != want or k.shape != v.shape:
            raise ConfigError(
                f"{name} must both have shape [tokens, {want[0]}, {want[1]}] (kv_heads, head_dim), "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ConfigError(f"{name} dtype must be the cache dtype {self.dtype}, got {k.dtype}/{v.dtype}")

    def append(
        self,
        session_id: str,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        log_mass: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append tokens (post-RoPE keys) to one layer; returns their slots. All-or-nothing."""
        t = self.table(session_id, layer)
        self._check_kv(k, v)
        n = k.shape[0]
        if positions.shape != (n, 3):
            raise ConfigError(f"positions must have shape [{n}, 3] (frame, h, w), got {tuple(positions.shape)}")
        if t.num_tokens % self.page_size and n:
            self._private(session_id, layer, [len(t.pages) - 1])  # the partly filled last page is written
        need = self.pages_for(t.num_tokens + n) - len(t.pages)
        if need > 0:
            # Raises BudgetError before anything is written: no half-appended block.
            t.pages.extend(self.pool.allocate(session_id, need))
        start = t.num_tokens
        t.num_tokens += n
        slots = self.slots(session_id, layer)[start:]
        self._write(slots, k, v, positions, log_mass)
        self._refresh_pages(t, range(start // self.page_size, len(t.pages)))
        return slots

    def _write(self, slots, k, v, positions=None, log_mass=None) -> None:
        kc = self.key_cache.view(-1, self.num_kv_heads, self.head_dim)
        vc = self.value_cache.view(-1, self.num_kv_heads, self.head_dim)
        kc[slots] = k.to(self.device)
        vc[slots] = v.to(self.device)
        if positions is not None:
            self.positions.view(-1, 3)[slots] = positions.to(self.device, torch.int32)
        lm = self.log_mass.view(-1)
        lm[slots] = 0.0 if log_mass is None else log_mass.to(self.device, torch.float32)
        for listener in self.listeners:
            listener.on_write(self.storage, slots)

    def update(
        self,
        session_id: str,
        layer: int,
        token_idx: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        log_mass: torch.Tensor,
    ) -> None:
        """Rewrite tokens in place (the 'merge' half of merge-in-place); positions are kept."""
        t = self.table(session_id, layer)
        self._check_kv(k, v)
        if token_idx.numel() and (int(token_idx.min()) < 0 or int(token_idx.max()) >= t.num_tokens):
            raise ConfigError(f"token_idx must lie in [0, {t.num_tokens})")
        self._private(session_id, layer, (token_idx // self.page_size).tolist())
        slots = self.slots(session_id, layer)[token_idx]
        kc = self.key_cache.view(-1, self.num_kv_heads, self.head_dim)
        vc = self.value_cache.view(-1, self.num_kv_heads, self.head_dim)
        write_slots(kc, vc, self.log_mass.view(-1), slots, k.to(self.device), v.to(self.device),
                    log_mass.to(self.device))  # kernels.dispatch, as compaction
        for listener in self.listeners:
            listener.on_write(self.storage, slots)
        self._refresh_pages(t, sorted(set((token_idx // self.page_size).tolist())))

    def compact(self, session_id: str, layer: int, keep: torch.Tensor) -> torch.Tensor:
        """Keep only tokens ``keep`` (indices into the layer's current order), free emptied pages back to vLLM's
        pool.  Returns ``order``: ``order[i]`` is the old index of the token now at index i.

        Attention over the cache has no mask, so it is invariant to the order of cached tokens, and time lives
        in each token's ``positions``.  Compaction therefore fills each hole left below ``len(keep)`` with a
        survivor from above it: it copies O(tokens removed), not O(cache) — a rolling window moves one block
        per step instead of the whole window.  Survivors already below ``len(keep)`` never move.
        """
        t = self.table(session_id, layer)
        keep = torch.as_tensor(keep, dtype=torch.int64, device=self.device).reshape(-1)
        if keep.numel():
            if int(keep.min()) < 0 or int(keep.max()) >= t.num_tokens:
                raise ConfigError(f"keep indices must lie in [0, {t.num_tokens})")
            if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
                raise ConfigError("keep indices must be strictly increasing")
        n_keep = keep.numel()
        kept = torch.zeros(t.num_tokens, dtype=torch.bool, device=self.device)
        kept[keep] = True
        holes = (~kept[:n_keep]).nonzero().flatten()  # free places below n_keep
        movers = kept[n_keep:].nonzero().flatten() + n_keep  # survivors above it (same count as holes)
        order = torch.arange(n_keep, device=self.device)
        tail_page = [self.pages_for(n_keep) - 1] if n_keep < t.num_tokens and n_keep % self.page_size else []
        self._private(session_id, layer, (holes // self.page_size).tolist() + tail_page)  # the pages written
        if holes.numel():
            slots = self.slots(session_id, layer)
            src, dst = slots[movers], slots[holes]
            kc = self.key_cache.view(-1, self.num_kv_heads, self.head_dim)
            vc = self.value_cache.view(-1, self.num_kv_heads, self.head_dim)
            pos, lm = self.positions.view(-1, 3), self.log_mass.view(-1)
            move_slots(kc, vc, pos, lm, src, dst)  # kernels.dispatch: Triton on CUDA, the torch reference elsewhere
            for listener in self.listeners:
                listener.on_write(self.storage, dst)
            order[holes] = movers
        n_pages, n_before = self.pages_for(n_keep), t.num_tokens
        freed = t.pages[n_pages:]
        del t.pages[n_pages:]
        t.num_tokens = n_keep
        if n_keep < n_before and n_keep % self.page_size:  # the tail of the last kept page (its vacated slots)
            tail = torch.arange(n_keep % self.page_size, self.page_size, device=self.device)
            self._zero_slots(t.pages[-1] * self.page_size + tail)
        if freed:
            self._drop_pages(session_id, freed)
        changed = set((holes // self.page_size).tolist()) | {n_pages - 1}
        self._refresh_pages(t, sorted(changed))
        return order

    def truncate(self, session_id: str, layer: int, num_tokens: int) -> None:
        """Drop the layer's tokens from index ``num_tokens`` on (undoes appends: nothing below it moves)."""
        n = self.table(session_id, layer).num_tokens
        if not 0 <= num_tokens <= n:
            raise ConfigError(f"num_tokens must lie in [0, {n}], got {num_tokens}")
        if num_tokens < n:
            self.compact(session_id, layer, torch.arange(num_tokens, device=self.device))

    # ---- scrubbing (the isolation invariant) ----------------------------------------------------
    def _zero_slots(self, slots: torch.Tensor) -> None:
        """Vacated slots of a kept page back to zero (reported like any write)."""
        h, d = self.num_kv_heads, self.head_dim
        self.key_cache.view(-1, h, d)[slots] = 0
        self.value_cache.view(-1, h, d)[slots] = 0
        self.positions.view(-1, 3)[slots] = 0
        self.log_mass.view(-1)[slots] = 0.0
        for listener in self.listeners:
            listener.on_write(self.storage, slots)

    def _free_pages(self, pages) -> None:
        """Scrub pages that are leaving their table (storage, summaries, listeners) before the pool gets them."""
        idx = torch.as_tensor(list(pages), dtype=torch.int64, device=self.device)
        for storage in (self.key_cache, self.value_cache, self.positions, self.log_mass):
            storage.index_fill_(0, idx, 0)
        for listener in self.listeners:
            listener.on_free(self.storage, idx.tolist())
        self._clear_pages(idx)

    # ---- per-page summaries (page_summaries.py) ------------------------------------------------------------
    def _clear_pages(self, pages) -> None:
        self.summaries.clear(pages)

    def _refresh_pages(self, t: LayerPageTable, page_positions) -> None:
        """Tell the summaries (if kept) that the table's pages at ``page_positions`` (indices into ``t.pages``)
        changed.  Cost O(pages touched): appends touch the tail, merges their own pages, compaction the moved
        suffix."""
        pos = [j for j in page_positions if 0 <= j < len(t.pages)]
        if not pos:
            return
        ids = torch.tensor([t.pages[j] for j in pos], dtype=torch.int64, device=self.device)
        valid = torch.tensor([min(self.page_size, t.num_tokens - j * self.page_size) for j in pos],
                             dtype=torch.int32, device=self.device)
        self.summaries.refresh(ids, valid)

    def page_summaries(self, session_id: str, layer: int) -> dict[str, torch.Tensor]:
        """Summaries of one layer's pages in table order: ``pages`` (ids), valid count, log total mass, key
        centroid and radius (largest key distance from the centroid) per kv head, ``epoch`` (changes with the
        page's contents)."""
        ids = torch.tensor(self.table(session_id, layer).pages, dtype=torch.int64, device=self.device)
        return self.summaries.of(ids)

    def recompute_page_summaries(self, session_id: str, layer: int) -> dict[str, torch.Tensor]:
        """From-scratch recomputation (the oracle the incremental summaries are tested against)."""
        t = self.table(session_id, layer)
        g = self.gather(session_id, layer)
        out = {"valid": [], "log_mass": [], "centroid": [], "radius": []}
        for j in range(len(t.pages)):
            sl = slice(j * self.page_size, min((j + 1) * self.page_size, t.num_tokens))
            k = g["k"][sl].float()
            out["valid"].append(sl.stop - sl.start)
            out["log_mass"].append(torch.logsumexp(g["log_mass"][sl], 0))
            out["centroid"].append(k.mean(0))
            out["radius"].append((k - k.mean(0)).norm(dim=-1).amax(0))
        if not t.pages:
            return {"valid": torch.zeros(0, dtype=torch.int32), "log_mass": torch.zeros(0),
                    "centroid": torch.zeros(0, self.num_kv_heads, self.head_dim),
                    "radius": torch.zeros(0, self.num_kv_heads)}
        return {"valid": torch.tensor(out["valid"], dtype=torch.int32), "log_mass": torch.stack(out["log_mass"]),
                "centroid": torch.stack(out["centroid"]), "radius": torch.stack(out["radius"])}

    # ---- reads ----------------------------------------------------------------------------------
    def gather(self, session_id: str, layer: int) -> dict[str, torch.Tensor]:
        """Contiguous copies of one layer's tokens (for references, policies and debugging)."""
        s = self.slots(session_id, layer)
        return {
            "k": self.key_cache.view(-1, self.num_kv_heads, self.head_dim)[s],
            "v": self.value_cache.view(-1, self.num_kv_heads, self.head_dim)[s],
            "positions": self.positions.view(-1, 3)[s],
            "log_mass": self.log_mass.view(-1)[s],
        }

    # ---- session export / import (snapshots) ---------------------------------------------------------
    def export_session(self, session_id: str) -> list[dict[str, torch.Tensor]]:
        """Copies of every layer's tokens (k, v, positions, log_mass) in table order.  ``import_session`` appends
        them in that order, so attention, whose reductions follow token order, sees exactly the same sequence."""
        return [self.gather(session_id, layer) for layer in range(self.num_layers)]

    def import_session(self, session_id: str, layers: list[dict[str, torch.Tensor]]) -> None:
        """Append ``export_session``'s output to an empty session of this cache (any page size), each layer's
        tokens in their order; page summaries are recomputed from storage as on every append, so with the same
        page size they equal the exporter's.  All-or-nothing: shapes are checked and the pages counted against
        the session's reservation (``BudgetError``) before anything is written."""
        if len(layers) != self.num_layers:
            raise ConfigError(f"import needs one token set per layer ({self.num_layers}), got {len(layers)}")
        for layer, t in enumerate(layers):
            if self.num_tokens(session_id, layer):
                raise ConfigError(f"import_session needs an empty session; layer {layer} of {session_id!r} has tokens")
            self._check_kv(t["k"], t["v"], f"layer {layer} k/v")
            n = t["k"].shape[0]
            if tuple(t["positions"].shape) != (n, 3) or tuple(t["log_mass"].shape) != (n,):
                raise ConfigError(f"layer {layer}: positions must be [{n}, 3] and log_mass [{n}], got "
                                  f"{tuple(t['positions'].shape)} and {tuple(t['log_mass'].shape)}")
        need = sum(self.pages_for(t["k"].shape[0]) for t in layers)
        free = self.pool.reserved(session_id) - self.pool.held(session_id)
        if need > free:
            raise BudgetError(f"the imported tokens need {need} pages of {self.page_size} slots; session "
                              f"{session_id!r} has {free} reserved pages free (num_pages / page_size)")
        for layer, t in enumerate(layers):
            if t["k"].shape[0]:
                self.append(session_id, layer, t["k"], t["v"], t["positions"], t["log_mass"])

    def utilisation(self) -> float:
        """Valid token slots / slots in held pages, over all sessions and layers (1.0 when nothing held)."""
        tokens = sum(t.num_tokens for ts in self._tables.values() for t in ts)
        pages = sum(len(t.pages) for ts in self._tables.values() for t in ts)
        return 1.0 if pages == 0 else tokens / (pages * self.page_size)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        for sid, tables in self._tables.items():
            owned = [p for t in tables for p in t.pages]
            assert len(owned) == len(set(owned)), f"{sid}: page in two layers"
            assert len(owned) == self.pool.held(sid), f"{sid}: tables {len(owned)} != pool {self.pool.held(sid)}"
            for t in tables:
                assert len(t.pages) == self.pages_for(t.num_tokens), f"{sid}: {t}"
        self._check_clean(self.live_slots())
        for listener in self.listeners:
            listener.check_invariants(self.storage)

    def live_slots(self) -> torch.Tensor:
        """Bool ``[num_pages + 1, page_size]``: which physical slots hold a live token of some table."""
        live = torch.zeros((self.num_pages + 1) * self.page_size, dtype=torch.bool, device=self.device)
        for sid in self._tables:
            for layer in range(self.num_layers):
                live[self.slots(sid, layer)] = True
        return live.view(self.num_pages + 1, self.page_size)

    def _check_clean(self, live: torch.Tensor) -> None:
        """The isolation invariant: every slot without a live token is all-zero (O(storage): tests only)."""
        dead = ~live
        for name in ("key_cache", "value_cache", "positions", "log_mass"):
            nonzero = getattr(self, name) != 0  # True for NaN too
            stale = dead & (nonzero.flatten(2).any(-1) if nonzero.dim() > 2 else nonzero)
            assert not bool(stale.any()), f"{name}: {int(stale.sum())} slots without a live token are not zero"
