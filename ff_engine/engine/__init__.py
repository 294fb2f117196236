"""Sessions, the flow-matching schedule and the block loop."""

from ff_engine.engine.engine import BlockResult, Engine, PagedSelfAttention
from ff_engine.engine.observer import AttentionCall, AttentionTap, EngineObserver, QueryMeans
from ff_engine.engine.sampler import FlowMatchSchedule
from ff_engine.engine.session import Session, SessionConfig

__all__ = [
    "AttentionCall",
    "AttentionTap",
    "BlockResult",
    "Engine",
    "EngineObserver",
    "FlowMatchSchedule",
    "PagedSelfAttention",
    "QueryMeans",
    "Session",
    "SessionConfig",
]
