"""Physical page allocation on vLLM's ``BlockPool`` plus per-session reservations.

vLLM's ``BlockPool`` owns the free list and the reference counts of physical
pages; we do not reimplement an allocator.  What vLLM does not have is a
*reservation*: a video stream declares its page budget when it is admitted and
must never be refused a page it reserved, however many other streams run.
``PagePool`` adds exactly that bookkeeping on top.

Forked streams share pages (copy-on-write, ``share``): vLLM's reference count of a page is the number of
sessions holding it (``BlockPool.touch`` adds one, ``free_blocks`` drops one and returns the page to the free
queue at zero).  A shared page counts against the reservation of *every* session holding it, so each session
can still grow to its whole reservation without asking anyone (copying a shared page before writing frees one
reference and takes one page: its count does not change), and the pages in use never exceed the reservations.

Invariants (checked by ``check_invariants`` and the property tests):
  * ``sum(reserved) <= capacity``: admission is exact, no overcommit.
  * for every session ``held(s) <= reserved(s)`` (shared pages included).
  * every held page's ref_cnt in vLLM's pool equals the number of sessions holding it.
  * ``capacity - |union of held| == BlockPool.get_num_free_blocks()``: a shared page is counted once.
Page id 0 is vLLM's null block and is never handed out.
The pool sees page ids, never their bytes: ``PagedKVCache`` scrubs a page (storage, summaries, derived layouts)
before it frees it here, so every page ``allocate`` hands out is all-zero whoever held it before (isolation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ff_engine.errors import BudgetError


def _make_block_pool(num_blocks: int):
    try:
        from vllm.v1.core.block_pool import BlockPool
    except ImportError as exc:  # pragma: no cover - exercised only without vLLM
        if os.environ.get("FF_ENGINE_BLOCK_POOL") == "fallback":  # vLLM-less verification machines only (docs/gpu.md)
            from ff_engine.cache.fallback_block_pool import FallbackBlockPool

            return FallbackBlockPool(num_blocks)
        raise ImportError(
            "ff-engine needs vLLM's block pool: pip install 'ff-engine[cpu]' (CPU) or 'ff-engine[cuda]'"
        ) from exc
    # Prefix caching is meaningless for video KV (no shared prompts between streams), so it stays off:
    # freed pages then go straight back to the LIFO end of the free queue.
    return BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=16)


@dataclass
class _Reservation:
    reserved: int
    held: set[int] = field(default_factory=set)


class PagePool:
    """``capacity`` usable pages (ids 1..capacity) on a vLLM ``BlockPool``."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise BudgetError(f"num_pages must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._pool = _make_block_pool(capacity + 1)  # +1: vLLM keeps block 0 as the null block
        self._blocks = {b.block_id: b for b in self._pool.blocks}
        self._sessions: dict[str, _Reservation] = {}

    # ---- reservations -------------------------------------------------------------------------
    @property
    def reserved_total(self) -> int:
        return sum(r.reserved for r in self._sessions.values())

    @property
    def unreserved(self) -> int:
        return self.capacity - self.reserved_total

    def can_reserve(self, num_pages: int) -> bool:
        return num_pages <= self.unreserved

    def reserve(self, session_id: str, num_pages: int) -> None:
        if session_id in self._sessions:
            raise BudgetError(f"session {session_id!r} already holds a reservation")
        if not isinstance(num_pages, int) or num_pages < 1:
            raise BudgetError(f"reservation must be >= 1 page, got {num_pages!r}")
        if num_pages > self.unreserved:
            raise BudgetError(
                f"reservation of {num_pages} pages for session {session_id!r} exceeds the "
                f"{self.unreserved} unreserved pages of {self.capacity} (num_pages)"
            )
        self._sessions[session_id] = _Reservation(num_pages)

    def release(self, session_id: str) -> None:
        """Free every page the session holds and drop its reservation (finish or cancel)."""
        res = self._sessions.pop(session_id, None)
        if res is None:
            return
        if res.held:
            self._pool.free_blocks([self._blocks[i] for i in sorted(res.held)])

    def reserved(self, session_id: str) -> int:
        return self._res(session_id).reserved

    def held(self, session_id: str) -> int:
        return len(self._res(session_id).held)

    def held_pages(self, session_id: str) -> list[int]:
        """The page ids the session holds, sorted ([] for a session without a reservation)."""
        res = self._sessions.get(session_id)
        return sorted(res.held) if res else []

    def sessions(self) -> list[str]:
        return list(self._sessions)

    # ---- pages ----------------------------------------------------------------------------------
    def allocate(self, session_id: str, num_pages: int) -> list[int]:
        res = self._res(session_id)
        if num_pages < 0:
            raise BudgetError(f"cannot allocate {num_pages} pages")
        if len(res.held) + num_pages > res.reserved:
            raise BudgetError(
                f"session {session_id!r} would hold {len(res.held) + num_pages} pages, "
                f"over its reservation of {res.reserved} (page budget)"
            )
        if num_pages == 0:
            return []
        ids = [b.block_id for b in self._pool.get_new_blocks(num_pages)]
        res.held.update(ids)
        return ids

    def share(self, session_id: str, page_ids: list[int]) -> None:
        """``session_id`` takes one more reference to pages another session holds (a fork); within its
        reservation, as any page it holds."""
        res = self._res(session_id)
        owned = [p for p in page_ids if p in res.held]
        if owned or len(set(page_ids)) != len(page_ids):
            raise BudgetError(f"session {session_id!r} already holds pages {owned or page_ids}")
        if len(res.held) + len(page_ids) > res.reserved:
            raise BudgetError(f"session {session_id!r} would hold {len(res.held) + len(page_ids)} pages, over its "
                              f"reservation of {res.reserved} (page budget)")
        blocks = [self._blocks[p] for p in page_ids]
        if any(b.ref_cnt < 1 for b in blocks):
            raise BudgetError(f"cannot share free pages {[b.block_id for b in blocks if b.ref_cnt < 1]}")
        self._pool.touch(blocks)
        res.held.update(page_ids)

    def refs(self, page_id: int) -> int:
        """How many sessions hold the page (vLLM's ref_cnt): above 1, it must be copied before it is written."""
        return self._blocks[page_id].ref_cnt

    def free(self, session_id: str, page_ids: list[int]) -> None:
        res = self._res(session_id)
        foreign = [p for p in page_ids if p not in res.held]
        if foreign:
            raise BudgetError(f"session {session_id!r} does not hold pages {foreign}")
        if len(set(page_ids)) != len(page_ids):
            raise BudgetError(f"duplicate page ids in free: {page_ids}")
        res.held.difference_update(page_ids)
        self._pool.free_blocks([self._blocks[i] for i in page_ids])

    @property
    def num_free(self) -> int:
        return self._pool.get_num_free_blocks()

    def check_invariants(self) -> None:
        holders: dict[int, int] = {}
        for sid, res in self._sessions.items():
            assert len(res.held) <= res.reserved, f"{sid} holds more than reserved"
            assert 0 not in res.held, "null page handed out"
            for p in res.held:
                holders[p] = holders.get(p, 0) + 1
        for p, n in holders.items():
            assert self._blocks[p].ref_cnt == n, f"page {p} ref_cnt {self._blocks[p].ref_cnt}, held by {n} sessions"
        seen = set(holders)
        assert self.reserved_total <= self.capacity
        assert self.capacity - len(seen) == self.num_free, (
            f"leak: capacity {self.capacity}, held {len(seen)}, free {self.num_free}"
        )

    def _res(self, session_id: str) -> _Reservation:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise BudgetError(f"unknown session {session_id!r}") from None
