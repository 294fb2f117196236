"""What the server holds besides routes: the model's description, the stream service, the prompt catalogue.

The server only talks to the ``StreamService`` contract (``ff_engine.serving.contract``): ``LocalService`` (one engine on
a background thread, the default) or ``RayCluster`` (``--ray``).  It keeps a copy of the model only to know its
geometry and to decode latents to pixels with the model's own decoder.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from ff_engine import models
from ff_engine.errors import ConfigError
from ff_engine.server.cost import check_cost
from ff_engine.server.schemas import NAME_PATTERN, RequestLimits, VideoRequest
from ff_engine.server.settings import ServerSettings


def load_model(settings: ServerSettings):
    """The model ``ff-engine generate`` would build from the same flags (``models.load_model``)."""
    return models.load_model(settings.model or models.DEFAULT_MODEL, preset=settings.preset,
                             random_weights=settings.random_weights, seed=0)


def length_field(req: VideoRequest) -> str:
    """The request field that sets its length (named by errors about length)."""
    return "frames" if req.frames is not None else "seconds"


def model_id(settings: ServerSettings) -> str:
    return Path(settings.model).stem if settings.model else "ff-world"


class PromptCatalog:
    """Server-side prompt embeddings, requested by name (the file stem).  Names are looked up in a listing made
    at start; a request's name is never joined into a path.  Files are read and checked by ``models.load_prompt``
    (the same checks as ``generate --prompt-embeds``)."""

    def __init__(self, folder: str, model_cfg):
        self.paths: dict[str, Path] = {}
        self.model_cfg = model_cfg
        if folder:
            root = Path(folder)
            if not root.is_dir():
                raise ConfigError(f"--prompts-dir: not a folder: {folder}")
            for p in sorted(root.iterdir()):
                if p.suffix in (".pt", ".safetensors") and re.match(NAME_PATTERN, p.stem):
                    self.paths[p.stem] = p

    def names(self) -> list[str]:
        return sorted(self.paths)

    def load(self, name: str | None, seed: int) -> torch.Tensor:
        """The named prompt, or the model's default (zeros for an unconditional model, a seeded one otherwise)."""
        if name is not None and name not in self.paths:
            raise ConfigError(f"prompt: unknown prompt {name!r}; the server has {self.names() or 'none'}")
        path = self.paths.get(name) if name else None
        return models.load_prompt(self.model_cfg, path, seed=seed, what="prompt")


def build_service(settings: ServerSettings, model):
    """``LocalService`` over one engine, ``RayCluster`` when ``--ray`` is given (``ServeCluster`` with
    ``--ray-serve``) ("local": start a Ray
    instance in this process; "auto" or an address: join a running cluster).  Blocks are persisted under
    ``output_dir/blocks`` so the service keeps only the last few blocks of each stream in memory."""
    from ff_engine import serving

    common = {
        "num_pages": settings.num_pages,
        "page_size": settings.page_size,
        "backend": settings.backend,
        "max_batch": settings.max_batch,
        "max_queue": settings.max_queue,
        "output_dir": str(Path(settings.output_dir) / "blocks"),
        "max_terminal": settings.max_records,
        "undo_blocks": settings.undo_blocks,
        "park_after": settings.park_after if settings.park_after > 0 else None,
    }
    if not settings.ray:
        return serving.LocalService(model, **common)
    source = model
    if settings.model and Path(settings.model).is_file() or not settings.model:
        source = serving.ModelSpec.checkpoint(settings.model or models.DEFAULT_MODEL, settings.preset)
    address = None if settings.ray == "local" else settings.ray
    if settings.ray_serve:
        autoscale = (settings.workers, settings.autoscale_max) if settings.autoscale_max else None
        return serving.ServeCluster(source, num_replicas=settings.workers, autoscale=autoscale, address=address,
                                    snapshot_every=settings.snapshot_every, **common)
    return serving.RayCluster(
        source, num_workers=settings.workers, snapshot_every=settings.snapshot_every, address=address, **common
    )


class Runtime:
    """Model description + service + prompts; builds ``SessionConfig`` objects from validated requests."""

    def __init__(self, settings: ServerSettings, service=None, model=None):
        self.settings = settings
        self.model = model if model is not None else load_model(settings)
        g = self.model.geometry
        self.geometry = g
        self.limits = RequestLimits(  # no RoPE table cap: --max-seconds (and memory, at admission) bound a stream
            max_frames=g.latent_frames(settings.max_seconds),
            latent_fps=g.fps / g.vae_stride[0],
            frames_per_block=g.frames_per_block,
        )
        self.prompts = PromptCatalog(settings.prompts_dir, self.model.cfg)
        self.model_id = model_id(settings)
        self.service = service if service is not None else build_service(settings, self.model)

    def decoder(self):
        return models.make_decoder(self.model)

    @functools.cached_property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the model's decoded video frames: one block of zero latents decoded once."""
        g = self.geometry
        with torch.no_grad():
            px = self.decoder().decode(torch.zeros(g.frames_per_block, g.latent_channels, *g.latent_hw))
        return int(px.shape[1]), int(px.shape[2])

    @functools.cached_property
    def default_prefix_frames(self) -> int:
        """The prefix ``generate`` uses for this model (the scroll world's whole-panorama pan; 0 otherwise)."""
        from model_adapters.world import prefix as wp

        return wp.default_prefix_frames(self.model.cfg) if wp.world_of(self.model.cfg) else 0

    def session_config(self, req: VideoRequest, session_id: str | None = None):
        """A ``SessionConfig`` for a validated request; ``ConfigError`` naming the field on what only the model
        or the policy can judge (a budget below one block, a prompt the model cannot take)."""
        from ff_engine.engine import SessionConfig
        from ff_engine.policies import make_policy

        if req.model is not None and req.model != self.model_id:
            raise ConfigError(f"model: this server serves {self.model_id!r}, got {req.model!r}")
        try:
            policy = make_policy(req.policy, **req.policy_params)
        except ConfigError as exc:
            raise ConfigError(f"policy_params: {exc}") from None
        budget = req.budget_frames if req.budget_frames is not None else self.limits.default_budget_frames
        frames = req.latent_frames(self.geometry, self.limits)
        if frames > self.limits.max_frames:
            raise ConfigError(f"seconds: {frames} latent frames exceed this server's {self.limits.max_frames} "
                              f"(--max-seconds {self.settings.max_seconds})")
        try:
            policy.validate(budget if policy.bounded else None, self.geometry.frames_per_block)
        except ConfigError as exc:
            raise ConfigError(f"budget_frames: {exc}") from None
        check_cost(policy, frames, self.geometry.frames_per_block, self.settings, length_field(req))
        prompt = self.prompts.load(req.prompt, req.seed)
        actions = self.action_indices(req.actions) if req.actions is not None else None
        prefix, actions = self.world_prefix(req.prefix_frames or 0, req.seed, actions)
        return SessionConfig(
            prompt=prompt,
            num_frames=frames + (0 if prefix is None else prefix.shape[0]),
            seed=req.seed,
            policy=policy,
            budget_frames=budget if policy.bounded else None,
            session_id=session_id,
            actions=actions,
            conditioning=self.conditioning(req.conditioning) if req.conditioning is not None else None,
            prefix=prefix,
        )

    def world_prefix(self, frames: int, seed: int, actions: list[int] | None):
        """(latents, actions) for ``prefix_frames``: the in-repo world with this seed (held out from training, as
        ``generate --seed``) under its own opening pan, then the request's actions; (None, actions) for 0."""
        if not frames:
            return None, actions
        from model_adapters.world import prefix as wp

        cfg, fpb = self.model.cfg, self.geometry.frames_per_block
        if wp.world_of(cfg) is None:
            raise ConfigError("prefix_frames: only an in-repo world model renders a prefix (its world)")
        if frames % fpb:
            raise ConfigError(f"prefix_frames: must be a multiple of the block ({fpb} latent frames), got {frames}")
        opening = wp.prefix_actions(cfg, frames)
        if getattr(cfg, "actions", None):
            actions = opening + (actions or [0])
        return wp.truth(cfg, wp.world_seed(seed), frames, opening).float(), actions

    def action_indices(self, actions: list) -> list[int]:
        """Action names or indices -> indices into the model's ``cfg.actions``; ``ConfigError`` naming
        ``actions`` (a model without actions takes none; an unknown name lists the known ones)."""
        names = tuple(getattr(self.model.cfg, "actions", ()) or ())
        if not names:
            raise ConfigError(f"actions: this model ({self.model_id}) takes no actions")
        out = []
        for i, a in enumerate(actions):
            if isinstance(a, str):
                if a not in names:
                    raise ConfigError(f"actions.{i}: unknown action {a!r}; one of {list(names)}")
                a = names.index(a)
            elif not 0 <= a < len(names):
                raise ConfigError(f"actions.{i}: index {a} out of [0, {len(names)}) ({list(names)})")
            out.append(a)
        return out

    def conditioning(self, fields: dict) -> dict:
        """Per-pixel-frame rows by field -> float32 tensors (the model checks names and widths at admission)."""
        if getattr(self.model, "check_conditioning", None) is None:
            raise ConfigError(f"conditioning: this model ({self.model_id}) takes no per-frame conditioning")
        out = {}
        for name, rows in fields.items():
            if len({len(r) for r in rows}) > 1:
                raise ConfigError(f"conditioning.{name}: every row must have the same width")
            out[name] = torch.tensor(rows, dtype=torch.float32)
        return out

    def describe(self) -> dict:
        g = self.geometry
        h, w = g.latent_hw
        return {
            "id": self.model_id,
            "object": "model",
            "owned_by": "ff-engine",
            "fps": g.fps,
            "frames_per_block": g.frames_per_block,
            "max_frames": self.limits.max_frames,
            "max_seconds": self.limits.max_seconds,
            "latent_shape": [g.latent_channels, h, w],
            "num_layers": g.num_layers,
            "prompts": self.prompts.names(),
            "backend": self.settings.backend,
            "page_size": self.settings.page_size,
            "actions": list(getattr(self.model.cfg, "actions", ()) or ()),
            "default_prefix_frames": self.default_prefix_frames,
            "conditioning": getattr(self.model, "steering_rows", dict)(),  # field -> row width (Matrix-Game)
            "undo_blocks": self.settings.undo_blocks,
            "park_after": self.settings.park_after,
        }
