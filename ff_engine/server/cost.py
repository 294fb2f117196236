"""A request's cost estimate: policy work per block x blocks, checked against operator limits.

Units: one unit is about the policy work of one block under a cheap default policy (a window, Future Forcing's
cheap form).  The work of the policies that can be made expensive grows with one or two parameters:

  * ``future-forcing``: the positions its query proxy is rotated to: ``horizon`` (cheap / moment forms) or
    ``horizon x samples`` (exact form): 1 + positions / 96 units (the exact form's defaults, 6 x 16: 2 units;
    ``samples=1024, horizon=64``: 684 units, measured 34.5 s for 30 latent frames against 2-4 s);
  * ``expected-attention(-post-rope)``: 1 + ``n_future_positions`` / 512;
  * ``h2o``, ``snapkv``: 1 + ``num_queries`` / 256;
  * every other policy: 1.

``--max-block-cost`` bounds the units of one block (default 32), ``--max-request-cost`` the units of a whole
request (blocks x units per block; default 16384: a 600-s stream of the world model is 1600 blocks).  A request
over either is a 422 naming the field that made it expensive.
"""

from __future__ import annotations

from dataclasses import dataclass

from ff_engine.errors import ConfigError


@dataclass(frozen=True)
class Cost:
    per_block: float
    blocks: int
    field: str  # the parameter that dominates the per-block cost

    @property
    def total(self) -> float:
        return self.per_block * self.blocks


def block_cost(policy) -> tuple[float, str]:
    """(units per block, the field that sets them) for a built policy object."""
    name = getattr(policy, "name", type(policy).__name__)
    get = lambda attr, default: getattr(policy, attr, default)
    if hasattr(policy, "samples") and hasattr(policy, "horizon"):  # Future Forcing
        exact = get("form", "cheap") == "exact"
        positions = get("horizon", 6) * (get("samples", 16) if exact else 1)
        return 1 + positions / 96, "policy_params.samples" if exact else "policy_params.horizon"
    if hasattr(policy, "n_future_positions"):
        return 1 + get("n_future_positions", 512) / 512, "policy_params.n_future_positions"
    if hasattr(policy, "num_queries"):
        return 1 + get("num_queries", 256) / 256, "policy_params.num_queries"
    return 1.0, f"policy ({name})"


def check_cost(policy, num_frames: int, frames_per_block: int, settings, length_field: str) -> Cost:
    """The request's ``Cost``; ``ConfigError`` naming the field when it is over a limit."""
    units, field = block_cost(policy)
    cost = Cost(units, -(-num_frames // frames_per_block), field)
    if units > settings.max_block_cost:
        raise ConfigError(
            f"{field}: this policy configuration costs {units:.0f} units of work per block, over this server's "
            f"{settings.max_block_cost} (--max-block-cost)"
        )
    if cost.total > settings.max_request_cost:
        raise ConfigError(
            f"{length_field}: {cost.blocks} blocks x {units:.1f} units = {cost.total:.0f} units of policy work, "
            f"over this server's {settings.max_request_cost} (--max-request-cost)"
        )
    return cost
