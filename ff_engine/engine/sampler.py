"""Few-step flow-matching schedule of Self-Forcing / CausVid (shift 5, steps 1000/750/500/250 warped)."""

from __future__ import annotations

import torch

from ff_engine.errors import ConfigError


class FlowMatchSchedule:
    """sigma(t) table of the reference ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` with 1000
    training steps, built in float32 exactly as the reference does so x0 = x_t - sigma * flow matches bit-for-bit
    in float64.  ``warp=True`` maps the step list onto the shifted timesteps (1000 -> 1000, 750 -> 937.5, ...)."""

    def __init__(self, shift: float = 5.0, steps=(1000, 750, 500, 250), warp: bool = True, num_train_timesteps: int = 1000,
                 stochastic: bool = True):
        if not steps or any(not 0 < s <= num_train_timesteps for s in steps):
            raise ConfigError(f"denoising steps must lie in (0, {num_train_timesteps}], got {list(steps)}")
        if shift <= 0:
            raise ConfigError(f"shift must be > 0, got {shift}")
        s = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = self.sigmas * num_train_timesteps
        # Between steps the x0 prediction is re-noised to the next level with fresh noise (Self-Forcing's
        # sampler, ``stochastic``) or with the noise the model itself implies, eps = x0 + flow, which makes
        # the loop the deterministic Euler / DDIM sampler of the flow ODE.
        self.stochastic = bool(stochastic)
        steps_t = torch.tensor(list(steps), dtype=torch.long)
        if warp:
            table = torch.cat([self.timesteps, torch.zeros(1)])
            self.denoising_timesteps = table[num_train_timesteps - steps_t]
        else:
            self.denoising_timesteps = steps_t.float()

    @classmethod
    def for_model(cls, model) -> FlowMatchSchedule:
        """The schedule a model was trained for (``cfg.sample_steps`` / ``cfg.sample_shift`` when it has them;
        Self-Forcing's otherwise)."""
        cfg = getattr(model, "cfg", None)
        steps, shift = getattr(cfg, "sample_steps", None), getattr(cfg, "sample_shift", None)
        if steps is None or shift is None:
            return cls()
        return cls(shift=float(shift), steps=tuple(int(s) for s in steps),
                   stochastic=bool(getattr(cfg, "sample_stochastic", True)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma of the nearest table timestep, for any shape of t (float32)."""
        idx = torch.argmin((self.timesteps[None, :] - t.reshape(-1, 1).float()).abs(), dim=1)
        return self.sigmas[idx].reshape(t.shape)

    def to_x0(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma(t) * flow in float64 (per frame; t [S, F], x [S, F, C, H, W])."""
        sig = self.sigma(t).double()[..., None, None, None]
        return (x_t.double() - sig * flow.double()).to(flow.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sig = self.sigma(t)[..., None, None, None].to(x0.dtype)
        return ((1 - sig) * x0 + sig * noise).to(noise.dtype)
