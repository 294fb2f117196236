"""The evaluation library behind the quality benchmarks: rollouts, the memory probe, paired statistics, a pool.

Importable (``from ff_engine.evaluation import rollout, memory_probe``) so benchmarks, tests and notebooks share
one implementation with public names instead of reaching into a script.  Modules:
  * ``specs``: the named policy settings the study compares, budgets as fractions of the unbounded cache;
  * ``rollout``: one free or teacher-forced rollout, ``AttentionTap`` (per-call attention outputs);
  * ``probe``: the memory probe (a returning subject, one-step denoising under each policy's cache);
  * ``rollouts``: free-rollout jobs, scoring without alignment, summaries and paired differences;
  * ``stats``: paired differences with a seed bootstrap; ``pool``: spawned workers; ``pictures``: image grids.
"""

from ff_engine.evaluation.pictures import image_grid
from ff_engine.evaluation.pool import run_jobs, worker_pool
from ff_engine.evaluation.probe import (
    PROBE_METRICS,
    PROBE_READOUT_T,
    PROBE_TIMESTEPS,
    memory_probe,
    one_step,
    probe_noise,
)
from ff_engine.evaluation.rollout import AttentionTap, layer_errors, rollout
from ff_engine.evaluation.rollouts import (
    ROLLOUT_METRICS,
    ROLLOUT_SEED_BASE,
    ROLLOUT_STARTS,
    RolloutJob,
    ground_truth_rollouts,
    paired_rollouts,
    rollout_jobs,
    run_rollout,
    score_rollout,
    summarise_rollouts,
)
from ff_engine.evaluation.specs import DEFAULT_POLICIES, EXPLORATORY, TRAIN_CLIP, policy_specs, to_budget
from ff_engine.evaluation.stats import mean_std, paired_differences

__all__ = [
    "DEFAULT_POLICIES", "EXPLORATORY", "PROBE_METRICS", "PROBE_READOUT_T", "PROBE_TIMESTEPS", "ROLLOUT_METRICS",
    "ROLLOUT_SEED_BASE", "ROLLOUT_STARTS", "TRAIN_CLIP", "AttentionTap", "RolloutJob", "ground_truth_rollouts",
    "image_grid", "layer_errors", "mean_std", "memory_probe", "one_step", "paired_differences", "paired_rollouts",
    "policy_specs", "probe_noise", "rollout", "rollout_jobs", "run_jobs", "run_rollout", "score_rollout",
    "summarise_rollouts", "to_budget", "worker_pool",
]
