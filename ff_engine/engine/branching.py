"""Fork and roll back a stream: the session operations an interactive world model needs ("try two actions
from here", "undo that").

* **Fork** (``fork_session``): a second stream from the exact state of the first.  The non-cache state
  (policy statistics, RNG, block cursor, latents, actions) is copied through the snapshot code, so a fork is
  exactly what a snapshot + restore would give; the K/V are *not* copied: the fork shares the source's pages
  through vLLM's reference counts (``PagedKVCache.fork_session``), and a page is copied only when one of the two
  writes, compacts or merges into it (``PagedKVCache._private``).  The fork reserves its own whole budget, so
  neither stream can run out mid-stream whatever the other does.
* **Rollback** (``UndoHistory``): the state before each of a stream's last ``undo_blocks`` blocks is kept; a
  rollback restores one.  Where the policy never compacts (unbounded), a mark is cheap: the non-cache state
  and the token count per layer, and rolling back truncates the appends made since.  Where it does (every
  bounded policy, once at its budget), the mark is a snapshot with the K/V (host memory: ``undo_blocks`` of
  them per stream at most), and rolling back restores it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ff_engine.engine.session import Session, new_session_id
from ff_engine.engine.snapshot import load_state, restore_session, session_config, snapshot_session
from ff_engine.errors import ConfigError


def fork_session(engine, source_id: str, fork_id: str | None = None) -> Session:
    """Admit a copy of active session ``source_id`` as ``fork_id`` (default: a fresh id), sharing its pages;
    ``BudgetError`` if its reservation does not fit, nothing admitted then."""
    if source_id not in engine.sessions:
        raise ConfigError(f"session_id {source_id!r} is not an active session (finished, failed or unknown)")
    snap = snapshot_session(engine, source_id, with_cache=False)
    session = engine.add_session(session_config(snap, fork_id or new_session_id()))
    try:
        load_state(session, snap, engine.cache.device)
        engine.cache.fork_session(source_id, session.id)
    except BaseException:
        engine.cancel(session.id)
        raise
    return session


@dataclass
class _Mark:
    snap: object  # SessionSnapshot, with the K/V or without
    tokens: list[int]  # per layer, at the mark
    with_cache: bool


@dataclass
class UndoHistory:
    """The last ``depth`` states of each stream, newest last (``Engine(undo_blocks=...)``)."""

    depth: int
    marks: dict[str, list[_Mark]] = field(default_factory=dict)

    def record(self, engine, session: Session) -> None:
        """Mark ``session`` as it is now (before its next block)."""
        if self.depth <= 0:
            return
        full = session.policy.bounded  # a bounded policy compacts: truncation cannot undo that
        snap = snapshot_session(engine, session.id, with_cache=full)
        tokens = [engine.cache.num_tokens(session.id, layer) for layer in range(engine.geometry.num_layers)]
        marks = self.marks.setdefault(session.id, [])
        marks.append(_Mark(snap, tokens, full))
        del marks[: max(0, len(marks) - self.depth)]

    def available(self, session_id: str) -> int:
        return len(self.marks.get(session_id, []))

    def forget(self, session_id: str) -> None:
        self.marks.pop(session_id, None)

    def rollback(self, engine, session_id: str, blocks: int) -> Session:
        """Return the stream to its state before its last ``blocks`` blocks; returns the (same-id) session."""
        marks = self.marks.get(session_id, [])
        if session_id not in engine.sessions:
            raise ConfigError(f"session_id {session_id!r} is not an active session (finished, failed or unknown)")
        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= len(marks):
            raise ConfigError(f"blocks must be an integer in [1, {len(marks)}] (the undo history this stream has; "
                              f"Engine undo_blocks={self.depth}), got {blocks!r}")
        mark = marks[-blocks]
        kept = marks[:-blocks]
        if mark.with_cache:
            engine.cancel(session_id)  # its pages return; the same reservation is taken again at once
            session = restore_session(engine, mark.snap, session_id)
        else:
            session = engine.sessions[session_id]
            for layer, n in enumerate(mark.tokens):
                engine.cache.truncate(session_id, layer, n)
            load_state(session, mark.snap, engine.cache.device)
        self.marks[session_id] = kept
        return session
