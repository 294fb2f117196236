"""The policy settings the quality study compares, by name, and budgets as fractions of the unbounded cache.

Shared by the quality benchmark, the memory probe and the free rollouts, so every section runs the same
settings under the same names.  The ``ff-*`` ablations keep ``sink_frames=0`` (what they were measured with before
Future Forcing's sink default, session 18) unless they name a sink.
"""

from __future__ import annotations


def policy_specs(budget: int) -> dict[str, tuple[str, dict]]:
    return {
        "window": ("window", {}),
        "sink-window": ("sink-window", {"sink_frames": 3}),
        "deep-sink": ("deep-sink", {"sink_frames": max(3, (budget // 2) // 3 * 3)}),
        "h2o": ("h2o", {"num_queries": 64}),
        "snapkv": ("snapkv", {"num_queries": 64}),
        "expected-attention": ("expected-attention", {}),  # kvpress's, faithful
        "expected-attention-post-rope": ("expected-attention-post-rope", {}),  # the earlier stand-in
        "future-forcing": ("future-forcing", {}),  # the registered default (no merge, 3 sink frames since session 18)
        "ff-no-merge": ("future-forcing", {"merge": "none", "sink_frames": 0}),
        "ff-sink3": ("future-forcing", {"sink_frames": 3}),  # = the default since session 18, by the name it was decided under
        "ff-affine-merge": ("future-forcing", {"merge": "affine", "sink_frames": 0}),
        "ff-no-covariance": ("future-forcing", {"covariance": False, "sink_frames": 0}),
        "ff-no-value-norm": ("future-forcing", {"value_norm": False, "sink_frames": 0}),
        "ff-horizon-1": ("future-forcing", {"horizon": 1, "sink_frames": 0}),
        "ff-page-candidates": ("future-forcing", {"page_candidates": True, "sink_frames": 0}),
        "ff-page-bound": ("future-forcing", {"page_candidates": True, "page_rank": "bound", "sink_frames": 0}),
        "ff-moment": ("future-forcing", {"form": "moment", "sink_frames": 0}),
        "ff-exact-form": ("future-forcing", {"form": "exact", "sink_frames": 0}),
        "ff-max": ("future-forcing", {"aggregation": "max", "sink_frames": 0}),
        "ff-nocov-max": ("future-forcing", {"covariance": False, "aggregation": "max", "sink_frames": 0}),
        "ff-importance-split": ("future-forcing", {"budget_split": "importance", "sink_frames": 0}),
        "random": ("random", {}),
        "key-norm": ("key-norm", {}),
    }


EXPLORATORY = {"ff-sink3", "random", "key-norm", "ff-page-bound", "ff-moment", "ff-exact-form", "ff-max", "ff-nocov-max",
               "ff-importance-split"}  # settings studied once; run on request (--policies)


DEFAULT_POLICIES = [name for name in policy_specs(0) if name not in EXPLORATORY]  # every baseline and ablation


TRAIN_CLIP = 24  # frames per training clip (model_adapters/world/train.py)


def to_budget(fraction: float, total: int, fpb: int) -> int:
    """A budget fraction of a ``total``-frame unbounded cache, in whole blocks (at least two)."""
    return max(2 * fpb, round(fraction * total / fpb) * fpb)
