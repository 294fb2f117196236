"""vLLM-Omni's streaming video output protocol, as vLLM-Omni serves it on ``WS /v1/realtime/video``
(vLLM-Omni ``docs/serving/streaming_video_output_api.md``), so that a vLLM-Omni client streams from ff-engine
unchanged.  The same path speaks ff-engine's own protocol (``realtime.py``); which one a connection speaks is
decided by its first ``session.start`` (``is_omni_start``).

Client -> server (JSON text):
  ``session.start``        ``prompt`` + vLLM-Omni's video fields (``format``, ``model``, ``width``, ``height``, ``fps``,
                           ``num_frames``, ``seconds``, ``size``, ``video_params``, ``seed``, ``extra_params``,
                           ``sampling_params``, ...); mapped onto ff-engine's request by ``plan_start``
  ``session.interaction``  ``{"interaction": {"event_id"?, "event": {"prompt"}, "transition_chunks"?}}``
  ``session.ping``         refreshes the stall clock
  ``session.stop``         cancels the generation
Server -> client, in this order:
  ``video.start`` {request_id, format: "m4s", config}; per generated block one ``video.chunk_metadata`` {request_id,
  kind: "media", num_frames, byte_length, generation_chunk_index, started/active/completed_event_ids,
  transport_chunk_index} immediately followed by exactly one binary message (fragmented MP4 bytes; the first
  holds the init segment ``ftyp`` + ``moov``, every later one ``moof`` + ``mdat`` fragments); at the end one
  ``kind: "trailer"`` chunk (the muxer's last bytes, ``generation_chunk_index`` null, ``num_frames`` 0);
  ``session.done`` {request_id, chunks, stopped}; then the server closes the connection (1000).
  ``session.interaction.queued`` {request_id, event_id}, ``session.pong``, ``error`` {message, code?, request_id?,
  event_id?} (plus ff-engine's ``param`` / ``status`` where known) between them.

What ff-engine cannot honour is refused by ONE ``error`` event naming every such field (then the connection
closes, as vLLM-Omni closes after a bad ``session.start``): a ``width`` / ``height`` / ``fps`` other than the
model's, diffusion knobs ff-engine has no counterpart for (``guidance_scale``, ``num_inference_steps``,
``negative_prompt``, ``lora``, ...), a free-text ``prompt`` for a text-conditioned model (ff-engine has no text
encoder: ``prompt`` must name a server-side prompt embedding; an unconditional model takes any text and ignores
it, which ``video.start``'s ``config.ff_engine.prompt`` says).  ff-engine's own fields travel in ``extra_params``
(``policy``, ``policy_params``, ``budget_frames``) and ``num_frames`` is honoured exactly (the last block's extra
frames are not sent).

Timing: ``session.start`` must arrive within ``--ws-start-timeout`` (10 s, vLLM-Omni's default); a session with
no generation progress and no ``session.ping`` for ``--ws-stall-timeout`` (60 s) gets an ``error`` ("Stall
timeout: no generation progress"), its stream is cancelled and ``session.done`` says ``stopped: true``.

Like vLLM-Omni's muxer (the same ``movflags``), the MP4 muxer writes a frame's fragment when the next frame
arrives, so the bytes of a chunk end one frame behind its frames and the trailer carries the last frame:
concatenated in receive order, the chunks are one playable fragmented MP4 with every frame.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect

from ff_engine.server.errors import ApiError
from ff_engine.server.frames import BlockRenderer, JpegEncoder, stream_blocks
from ff_engine.server.schemas import NAME_PATTERN, first_error

log = logging.getLogger("ff_engine.server")
FORMAT = "m4s"
MOVFLAGS = "+frag_every_frame+empty_moov+default_base_moof"  # vLLM-Omni's FragmentedMP4Muxer's
CODEC_OPTIONS = {"preset": "ultrafast", "tune": "zerolatency", "crf": "18"}  # vLLM-Omni's streaming defaults
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
X264_TUNES = ("film", "animation", "grain", "stillimage", "fastdecode", "zerolatency")
POLL_S = 1.0  # the control loop's wake-up for the stall clock (vLLM-Omni's _CONTROL_POLL_INTERVAL)
FF_EXTRA = ("policy", "policy_params", "budget_frames", "video_codec_options")

# vLLM-Omni's fields ff-engine has no counterpart for: refused when set (to anything but vLLM-Omni's default).
UNSUPPORTED = {
    "negative_prompt": "ff-engine's samplers take no negative prompt",
    "num_inference_steps": "the denoising steps are the model's own (fixed by its distillation)",
    "guidance_scale": "ff-engine's samplers have no classifier-free guidance",
    "guidance_scale_2": "ff-engine's samplers have no classifier-free guidance",
    "true_cfg_scale": "ff-engine's samplers have no classifier-free guidance",
    "boundary_ratio": "ff-engine serves one transformer (no low/high-noise split)",
    "flow_shift": "the timestep shift is the model's own",
    "image_reference": "ff-engine streams take no reference image",
    "lora": "ff-engine serves no LoRA adapters",
    "generate_sound": "ff-engine makes no audio",
    "sound_duration": "ff-engine makes no audio",
    "enable_frame_interpolation": "ff-engine does no frame interpolation",
    "frame_interpolation_exp": "ff-engine does no frame interpolation",
    "frame_interpolation_scale": "ff-engine does no frame interpolation",
    "frame_interpolation_model_path": "ff-engine does no frame interpolation",
}
OMNI_DEFAULTS = {"generate_sound": False, "enable_frame_interpolation": False, "frame_interpolation_exp": 1,
                 "frame_interpolation_scale": 1.0}


class OmniVideoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int | None = Field(None, ge=1, le=16384)
    height: int | None = Field(None, ge=1, le=16384)
    num_frames: int | None = Field(None, ge=1, le=2**31)
    fps: int | None = Field(None, ge=1, le=1000)


class OmniStart(OmniVideoParams):
    """vLLM-Omni's ``session.start`` (its ``VideoGenerationRequest`` fields + ``format``), typed as vLLM-Omni
    types them (lax: ``"640"`` is 640, as there), bounded, unknown fields refused."""

    type: Literal["session.start"]
    format: str = FORMAT
    model: str | None = Field(None, max_length=256)
    prompt: str = Field(max_length=8192)
    seconds: str | None = Field(None, pattern=r"^[1-9]\d{0,4}$")
    size: str | None = Field(None, pattern=r"^\d{1,5}x\d{1,5}$")
    video_params: OmniVideoParams | None = None
    user: str | None = Field(None, max_length=256)  # tracking only, as in vLLM-Omni
    response_format: Literal["file", "path"] = "file"  # ignored by vLLM-Omni's streaming route too
    seed: int | None = None
    extra_params: dict[str, Any] | None = Field(None, max_length=32)
    negative_prompt: str | None = Field(None, max_length=8192)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    true_cfg_scale: float | None = None
    boundary_ratio: float | None = None
    flow_shift: float | None = None
    image_reference: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    generate_sound: bool = False
    sound_duration: float | None = None
    enable_frame_interpolation: bool = False
    frame_interpolation_exp: int = 1
    frame_interpolation_scale: float = 1.0
    frame_interpolation_model_path: str | None = Field(None, max_length=1024)


OMNI_ONLY = (set(OmniStart.model_fields) | {"sampling_params"}) - {
    "type", "model", "prompt", "seconds", "seed"}  # the fields ff-engine's session.start does not have


def is_omni_start(data: dict) -> bool:
    """Whether a ``session.start`` is vLLM-Omni's: it has a field only vLLM-Omni's has (``format``, ``num_frames``,
    ``width``...), or a ``prompt`` that is text rather than a prompt name, or ``seconds`` as a string."""
    if data.get("type") != "session.start":
        return False
    if OMNI_ONLY & set(data):
        return True
    prompt = data.get("prompt")
    return isinstance(data.get("seconds"), str) or isinstance(prompt, str) and not re.match(NAME_PATTERN, prompt)


class OmniRefusal(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 422):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class StartPlan:
    """A vLLM-Omni ``session.start`` mapped onto ff-engine: the ff-engine request, the frames to send, the codec
    options, and what ``video.start`` echoes as ``config``."""

    request: dict
    num_frames: int
    fps: int
    codec_options: dict
    config: dict


def coerce(msg: dict) -> dict:
    """vLLM-Omni's ``_coerce_request_data``: ``sampling_params`` entries become fields (when not given at top
    level) or ``extra_params``."""
    data = {k: v for k, v in msg.items() if k != "sampling_params"}
    sp = msg.get("sampling_params")
    if isinstance(sp, dict):
        extra = dict(data.get("extra_params") or {})
        for k, v in sp.items():
            if k in OmniStart.model_fields and k not in data and k not in ("type", "format"):
                data[k] = v
            else:
                extra[k] = v
        if extra:
            data["extra_params"] = extra
    elif sp is not None:
        raise OmniRefusal("Invalid session.start: sampling_params must be a JSON object", "sampling_params")
    return data


def plan_start(msg: dict, runtime, request_model) -> StartPlan:
    """Map a vLLM-Omni ``session.start`` onto an ff-engine request; ``OmniRefusal`` names what cannot be
    honoured (all of it, in one message)."""
    if msg.get("format", FORMAT) != FORMAT:
        raise OmniRefusal("Invalid session.start format: expected 'm4s'.", "format", "unsupported_format")
    try:
        start = OmniStart.model_validate(coerce(msg))
    except ValidationError as exc:
        where, what = first_error(exc)
        raise OmniRefusal(f"Invalid session.start: {where}: {what}", where) from None
    g, (h, w) = runtime.geometry, runtime.frame_size
    vp = start.video_params or OmniVideoParams()
    width, height = start.width or vp.width, start.height or vp.height
    if start.size:
        width, height = (int(x) for x in start.size.split("x"))
    fps = start.fps or vp.fps
    problems: list[tuple[str, str]] = []
    if start.model is not None and start.model != runtime.model_id:
        problems.append(("model", (f"Model mismatch: request specifies {start.model!r} but server is running "
                                  f"{runtime.model_id!r}.")))
    if (width, height) != (None, None) and (width, height) != (w, h):
        problems.append(("width" if width != w else "height",
                         f"width {width} x height {height}: this model makes {w} x {h} frames"))
    if fps is not None and fps != g.fps:
        problems.append(("fps", f"fps {fps}: this model's video is {g.fps} fps"))
    for name, why in UNSUPPORTED.items():
        value = getattr(start, name)
        if value is not None and value != OMNI_DEFAULTS.get(name):
            problems.append((name, f"{name}: {why}"))
    extra = dict(start.extra_params or {})
    for name in sorted(set(extra) - set(FF_EXTRA)):
        problems.append((f"extra_params.{name}", (f"extra_params.{name}: not a parameter ff-engine knows "
                                                 f"(it takes {', '.join(FF_EXTRA)})")))
    prompt_name = prompt_of(start.prompt, runtime, problems)
    codec = codec_options(extra.pop("video_codec_options", None), problems)
    if problems:
        raise OmniRefusal("session.start: cannot honour " + "; ".join(p[1] for p in problems), problems[0][0],
                          "unsupported")
    num_frames = start.num_frames or vp.num_frames
    if num_frames is None:
        seconds = int(start.seconds) if start.seconds else runtime.limits.default_seconds
        num_frames = max(1, round(seconds * g.fps))
    latent = 1 + -(-(num_frames - 1) // g.vae_stride[0])  # the fewest latent frames that decode to num_frames
    req = {"frames": latent, "seed": start.seed or 0, "prompt": prompt_name,
           **{k: extra[k] for k in ("policy", "policy_params", "budget_frames") if k in extra}}
    try:
        checked = request_model.model_validate({k: v for k, v in req.items() if v is not None})
    except ValidationError as exc:
        where, what = first_error(exc)
        where = {"frames": "num_frames", "seed": "seed", "prompt": "prompt"}.get(where, f"extra_params.{where}")
        raise OmniRefusal(f"Invalid session.start: {where}: {what}", where) from None
    config = {**start.model_dump(exclude_none=True, exclude={"type", "format"}),
              "width": w, "height": h, "fps": g.fps, "num_frames": num_frames,
              "ff_engine": {"frames": latent, "policy": checked.policy, "policy_params": checked.policy_params,
                            "budget_frames": checked.budget_frames, "prompt": prompt_name}}
    return StartPlan(checked.model_dump(exclude_none=True), num_frames, g.fps, codec, config)


def prompt_of(text: str, runtime, problems: list) -> str | None:
    """The server-side prompt ``text`` names, None for an unconditional model's free text (it takes no prompt);
    a problem for free text a conditional model would need encoded."""
    if text in runtime.prompts.paths:
        return text
    if not runtime.model.cfg.conditional:
        return None
    names = runtime.prompts.names()
    problems.append(("prompt", ("prompt: ff-engine has no text encoder; prompt must name one of the server's "
                               f"prompt embeddings ({names or 'none: start the server with --prompts-dir'})")))
    return None


def codec_options(given, problems: list) -> dict:
    """vLLM-Omni's ``extra_params.video_codec_options`` (x264 ``preset``, ``tune``, ``crf``), checked."""
    opts = dict(CODEC_OPTIONS)
    if given is None:
        return opts
    if not isinstance(given, dict):
        problems.append(("extra_params.video_codec_options", "extra_params.video_codec_options: must be an object"))
        return opts
    allowed = {"preset": X264_PRESETS, "tune": X264_TUNES, "crf": tuple(str(i) for i in range(52))}
    for k, v in given.items():
        if k not in allowed or str(v) not in allowed[k]:
            problems.append((f"extra_params.video_codec_options.{k}", (f"extra_params.video_codec_options.{k}: "
                             f"{str(v)[:40]!r} is not one of the options ff-engine takes (preset, tune, crf 0-51)")))
        else:
            opts[k] = str(v)
    return opts


class FragmentedMp4:
    """One fragmented MP4 (H.264) built in memory: ``encode(frames)`` returns the bytes muxed since the last
    call (the first call's begin with the init segment, ``ftyp`` + ``moov``; then ``moof`` + ``mdat``, one
    fragment per frame), ``close()`` the rest.  Frames are cropped to even sizes (yuv420p)."""

    def __init__(self, fps: int, options: dict | None = None):
        import av

        self._av, self.fps, self.options = av, fps, dict(options or CODEC_OPTIONS)
        self.buf = io.BytesIO()
        self.container = av.open(self.buf, mode="w", format="mp4", options={"movflags": MOVFLAGS})
        self.stream = None
        self.closed = False

    def encode(self, frames: np.ndarray) -> bytes:
        if self.stream is None:
            h, w = frames.shape[1:3]
            self.stream = self.container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(10000))
            self.stream.width, self.stream.height = w - w % 2, h - h % 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = self.options
            self.stream.codec_context.max_b_frames = 0
        sh, sw = self.stream.height, self.stream.width
        for f in frames:
            img = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:sh, :sw]), format="rgb24")
            for packet in self.stream.encode(img):
                self.container.mux(packet)
        return self._take()

    def close(self) -> bytes:
        if self.closed:
            return b""
        self.closed = True
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()
        return self._take()

    def _take(self) -> bytes:
        data = self.buf.getvalue()
        self.buf.seek(0)
        self.buf.truncate()
        return data


@dataclass
class Interactions:
    """Prompt updates of a session: event id -> the generation chunk it applies at."""

    applies_at: dict[str, int] = field(default_factory=dict)

    def at(self, chunk: int) -> dict:
        """The event ids of a chunk.  ff-engine switches a prompt at a block boundary (a hard change, no
        transition): an update starts, is under way and completes in the chunk it applies at."""
        started = [e for e, b in self.applies_at.items() if b == chunk]
        return {"started_event_ids": started, "active_event_ids": list(started), "completed_event_ids": list(started)}


class OmniSession:
    """One vLLM-Omni session on an accepted WebSocket (one per connection, as in vLLM-Omni)."""

    def __init__(self, ws, state, owner: str):
        self.ws, self.state, self.owner, self.settings = ws, state, owner, state.settings
        self.lock = asyncio.Lock()
        self.rec = None
        self.stopped = False
        self.chunks = 0  # transport chunks sent
        self.next_block = 0  # the next generation chunk not yet sent
        self.last_progress = time.monotonic()
        self.interactions = Interactions()

    def touch(self) -> None:
        self.last_progress = time.monotonic()

    async def send(self, event: dict, data: bytes | None = None) -> None:
        async with self.lock:  # a chunk's metadata and its bytes are never split by another event
            await self.ws.send_text(json.dumps(event))
            if data is not None:
                await self.ws.send_bytes(data)

    async def error(self, message: str, code: str | None = None, param: str | None = None, status: int | None = None,
                    event_id: str | None = None, **extra) -> None:
        ev = {"type": "error", "message": message}
        ev.update({k: v for k, v in (("code", code), ("request_id", self.rec.id if self.rec else None),
                                     ("event_id", event_id), ("param", param), ("status", status)) if v is not None})
        try:
            await self.send({**ev, **extra})
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass

    async def run(self, start: dict) -> None:
        from ff_engine.server.app import submit

        try:
            plan = plan_start(start, self.state.runtime, self.state.request_model)
            self.rec = await submit(self.state.registry, self.state.request_model.model_validate(plan.request),
                                    self.owner, "omni")
        except OmniRefusal as exc:
            await self.error(exc.message, exc.code, exc.param, exc.status)
            return await self.close()
        except ApiError as exc:
            retry = (exc.headers or {}).get("Retry-After")
            await self.error(exc.message, exc.code, exc.param, exc.status,
                             **({"retry_after": int(retry)} if retry else {}))
            return await self.close()
        try:
            await self.send({"type": "video.start", "request_id": self.rec.id, "format": FORMAT, "config": plan.config})
            self.touch()
            await self.serve(plan)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:  # the client went: its stream goes too
            log.info("omni: %s: client gone (%s)", self.rec.id, type(exc).__name__)
        finally:
            if self.rec.final is None:
                await asyncio.to_thread(self.rec.handle.cancel)

    async def serve(self, plan: StartPlan) -> None:
        control = asyncio.create_task(self.control())
        produce = asyncio.create_task(self.produce(plan))
        try:
            await asyncio.wait({control, produce}, return_when=asyncio.FIRST_COMPLETED)
            if not produce.done():  # the client went (the control loop ended): nothing more to send
                return
            control.cancel()
            await asyncio.gather(control, return_exceptions=True)
            if (failed := produce.result()) is not None:  # as vLLM-Omni: an error, no session.done
                await self.error(failed, "generation_failed", status=500)
            else:
                await self.send({"type": "session.done", "request_id": self.rec.id, "chunks": self.chunks,
                                 "stopped": self.stopped})
            await self.close()
        finally:
            for t in (control, produce):
                t.cancel()
            await asyncio.gather(control, produce, return_exceptions=True)

    async def close(self) -> None:
        try:
            await self.ws.close(1000)
        except (RuntimeError, OSError):
            pass

    # ---- the stream's chunks -------------------------------------------------------------------------------
    async def produce(self, plan: StartPlan) -> str | None:
        """Send every block as one fMP4 chunk (then the trailer); the stream's error when it failed."""
        renderer = BlockRenderer(self.state.runtime.decoder(), JpegEncoder(self.settings.jpeg_quality))
        encoder = FragmentedMp4(plan.fps, plan.codec_options)
        left = plan.num_frames
        try:
            async for blk in stream_blocks(self.rec.handle):
                self.touch()
                px = await asyncio.to_thread(renderer.pixels, blk.latents)  # every block: the decoder keeps state
                px = px[: max(left, 0)]
                if self.stopped or not len(px):
                    continue
                left -= len(px)
                data = await asyncio.to_thread(encoder.encode, px)
                if data:
                    await self.chunk("media", data, len(px), blk.block)
                self.next_block = blk.block + 1
            st = await asyncio.to_thread(self.rec.handle.status)
            if st.state == "failed":
                return f"Generation failed: {st.error}"
            tail = await asyncio.to_thread(encoder.close)
            if tail and not self.stopped:
                await self.chunk("trailer", tail, 0, None)
            self.stopped = self.stopped or st.state == "cancelled"
            return None
        finally:
            await asyncio.to_thread(encoder.close)

    async def chunk(self, kind: str, data: bytes, frames: int, block: int | None) -> None:
        ids = self.interactions.at(block) if block is not None else \
            {"started_event_ids": [], "active_event_ids": [], "completed_event_ids": []}
        meta = {"type": "video.chunk_metadata", "request_id": self.rec.id, "kind": kind, "num_frames": frames,
                "byte_length": len(data), "generation_chunk_index": block, **ids, "transport_chunk_index": self.chunks}
        await self.send(meta, data)
        self.chunks += 1
        self.touch()

    # ---- client events ---------------------------------------------------------------------------------------
    async def control(self) -> None:
        """Client events until the client goes; the stall clock (no progress, no ping) is checked every second."""
        stall = self.settings.ws_stall_timeout
        while True:
            if not self.stopped and time.monotonic() - self.last_progress > stall:
                await self.error("Stall timeout: no generation progress", "stall_timeout", status=408)
                self.stopped = True
                await asyncio.to_thread(self.rec.handle.cancel)
            try:
                msg = await asyncio.wait_for(self.ws.receive(), timeout=min(POLL_S, stall))
            except TimeoutError:
                continue
            if msg["type"] == "websocket.disconnect":
                return
            await self.on_message(msg.get("text"))

    async def on_message(self, text: str | None) -> None:
        if text is None:
            return await self.error("WebSocket messages must be JSON text", "invalid_message", "message", 400)
        try:
            msg = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return await self.error("Invalid JSON message", "invalid_json", "message", 400)
        if not isinstance(msg, dict):
            return await self.error("WebSocket messages must be JSON objects", "invalid_json", "message", 400)
        typ = msg.get("type")
        if typ == "session.stop":
            if not self.stopped:
                self.stopped = True
                await asyncio.to_thread(self.rec.handle.cancel)
        elif typ == "session.ping":
            self.touch()
            await self.send({"type": "session.pong"})
        elif typ == "session.interaction":
            await self.on_interaction(msg)
        else:
            await self.error(f"Unknown message type: {json.dumps(typ)[:64]}", "unknown_event", "type", 422)

    async def on_interaction(self, msg: dict) -> None:
        """A prompt update (vLLM-Omni's checks and messages), applied at the stream's next block boundary."""
        inter = msg.get("interaction")
        if not isinstance(inter, dict):
            return await self.error("session.interaction requires an interaction object", "invalid_value",
                                    "interaction", 422)
        eid = inter.get("event_id")
        if eid is not None and (not isinstance(eid, str) or not re.match(r"^[A-Za-z0-9_.:-]{1,64}$", eid)):
            return await self.error("session.interaction event_id must be a non-empty string (at most 64 of "
                                    "[A-Za-z0-9_.:-])", "invalid_value", "interaction.event_id", 422)
        eid = eid or uuid.uuid4().hex
        event = inter.get("event")
        prompt = event.get("prompt") if isinstance(event, dict) else None
        if not isinstance(event, dict):
            return await self.error("session.interaction requires event object", "invalid_value",
                                    "interaction.event", 422, eid)
        if not isinstance(prompt, str) or not prompt.strip():
            return await self.error("session.interaction requires a non-empty event.prompt", "invalid_value",
                                    "interaction.event.prompt", 422, eid)
        if event.get("negative_prompt") is not None:
            return await self.error("session.interaction negative_prompt is not supported in this release",
                                    "unsupported", "interaction.event.negative_prompt", 422, eid)
        tc = inter.get("transition_chunks")
        if tc is not None and (isinstance(tc, bool) or not isinstance(tc, int) or tc != 0):
            return await self.error("session.interaction transition_chunks: ff-engine switches the prompt at the "
                                    "next block boundary (a hard change); only 0 can be honoured", "unsupported",
                                    "interaction.transition_chunks", 422, eid)
        if eid in self.interactions.applies_at:
            return await self.error("event_id_conflict", "event_id_conflict", "interaction.event_id", 409, eid)
        await self.apply(eid, prompt)

    async def apply(self, eid: str, prompt: str) -> None:
        rt = self.state.runtime
        if prompt not in rt.prompts.paths:
            return await self.error(f"session.interaction: ff-engine has no text encoder; event.prompt must name one "
                                    f"of the server's prompt embeddings ({rt.prompts.names() or 'none'})",
                                    "interaction_failed", "interaction.event.prompt", 422, eid)
        try:
            tensor = rt.prompts.load(prompt, 0)
            applies = await asyncio.to_thread(self.rec.handle.update, tensor)
        except ValueError as exc:  # FFEngineError: a prompt the model refuses, or the stream ended meanwhile
            return await self.error(f"Failed to apply interaction: {str(exc).splitlines()[0]}", "interaction_failed",
                                    "interaction.event.prompt", 409, eid)
        self.interactions.applies_at[eid] = applies if applies is not None else self.next_block
        await self.send({"type": "session.interaction.queued", "request_id": self.rec.id, "event_id": eid})
