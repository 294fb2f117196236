// ff-engine live viewer: one WebSocket per stream (/v1/realtime/video), JPEG frames drawn on a canvas.
// No build step. window.ffViewer.streams exposes each stream's counters (used by the headless-browser test).
// A model with actions is steered with the arrow keys (the selected stream: click a panel), space pauses; each
// key gets the server's two receipts (control.received, then session.updated with the block it applies at).
"use strict";

const $ = (id) => document.getElementById(id);
const viewer = { streams: [], model: null, selected: null };
window.ffViewer = viewer;

function key() { return $("key").value.trim(); }

async function api(path) {
  const headers = key() ? { Authorization: `Bearer ${key()}` } : {};
  const r = await fetch(path, { headers });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  return body;
}

async function init() {
  try {
    const models = await api("/v1/models");
    const m = models.data[0];
    viewer.model = m;
    $("model").textContent = `model ${m.id}: ${m.fps} fps, ${m.frames_per_block} latent frames per block, ` +
      `up to ${m.max_seconds.toFixed(0)} s, page size ${m.page_size}`;
    const steerable = (m.actions || []).length > 0;
    $("steer-hint").hidden = !steerable;
    $("rows-hint").hidden = !Object.keys(m.conditioning || {}).length;
    $("prefix-label").hidden = !(m.default_prefix_frames > 0);
    const policies = await api("/v1/policies");
    $("policy").innerHTML = "";
    for (const p of policies.data) {
      const o = document.createElement("option");
      o.value = o.textContent = p.name;
      o.title = p.description || "";
      if (p.name === "future-forcing") o.selected = true;
      $("policy").appendChild(o);
    }
    $("error").textContent = "";
  } catch (e) {
    $("error").textContent = `${e.message} (an API key may be needed)`;
  }
}

function panel(title) {
  const el = document.createElement("div");
  el.className = "stream";
  el.innerHTML = `<header><span>${title}</span><button class="cancel">cancel</button></header>
    <canvas width="384" height="256"></canvas>
    <div class="stats"><span>fps<b class="fps">–</b></span><span>blocks<b class="blocks">0</b></span>
    <span>pages<b class="pages">0</b></span><span>state<b class="state">starting</b></span></div>
    <div class="behind" hidden>generation is behind real time: waiting for frames</div>
    <div class="steer muted"></div>
    <div class="panel-errors"></div>`;
  $("streams").appendChild(el);
  return el;
}

function startStream(params) {
  const el = panel(`${params.policy} · budget ${params.budget_frames} · seed ${params.seed}`);
  const canvas = el.querySelector("canvas");
  const ctx = canvas.getContext("2d");
  const s = { params, frames: 0, blocks: 0, state: "starting", arrivals: [], pagesHeld: 0, error: null,
              sent: [], received: [], applied: [], paused: false, id: null, el, key: null, mouse: [0, 0],
              buffer: [], arrived: 0, stalls: 0, behind: false, videoFps: 16 };
  viewer.streams.push(s);
  select(s);
  el.addEventListener("click", () => select(s));
  let drag = null;  // a drag over the canvas: the camera delta for Matrix-Game's mouse rows
  canvas.addEventListener("mousedown", (e) => { drag = [e.clientX, e.clientY]; });
  canvas.addEventListener("mouseup", (e) => {
    const widths = (viewer.model && viewer.model.conditioning) || {};
    if (!drag || !widths.mouse_cond) return;
    s.mouse = [(e.clientY - drag[1]) / canvas.clientHeight, (e.clientX - drag[0]) / canvas.clientWidth];
    drag = null;
    if (control(s, { conditioning: conditioningRows(s) })) {
      s.sent[s.sent.length - 1].action = `camera ${s.mouse.map((v) => v.toFixed(2)).join(", ")}`;
      showSteer(s);
    }
  });
  const show = (cls, text) => { el.querySelector("." + cls).textContent = text; };
  const fail = (text) => {  // this panel's own error lines (the last 5), and the reason on the canvas
    s.error = text; s.errors = (s.errors || []).concat([text]).slice(-5);
    el.querySelector(".panel-errors").textContent = s.errors.join("\n");
    if (!s.frames) { ctx.fillStyle = "#ff6b6b"; ctx.font = "14px sans-serif"; ctx.fillText(text.slice(0, 60), 8, 24); }
  };
  const fps = () => {  // frames of the last 2 s: decays to 0 when frames stop, "–" once the stream ended
    const now = performance.now();
    while (s.arrivals.length && s.arrivals[0] < now - 2000) s.arrivals.shift();
    show("fps", ended ? "–" : (s.arrivals.length / 2).toFixed(1));
  };
  let ended = false, generating = true, started = false;
  const ticker = setInterval(fps, 500);
  // Playback at the video's fps from a small buffer (a block's frames), not as frames arrive: when the buffer runs
  // dry while the stream still generates, generation is behind real time (counted in s.stalls, shown on the panel).
  const play = () => {
    if (!started && s.buffer.length < Math.max(1, frameBlock) && generating) return;
    started = true;
    const bmp = s.buffer.shift();
    if (bmp) {
      ctx.drawImage(bmp, 0, 0, canvas.width, canvas.height);
      s.frames += 1;
      s.arrivals.push(performance.now());
      if (s.behind) { s.behind = false; el.querySelector(".behind").hidden = true; }
    } else if (generating && !s.paused) {
      if (!s.behind) { s.behind = true; s.stalls += 1; el.querySelector(".behind").hidden = false; }
    }
    if (!generating && !s.buffer.length) clearInterval(s.player);
  };
  let frameBlock = 0;
  const startPlayer = (fpsValue) => {
    s.videoFps = fpsValue || 16;
    clearInterval(s.player);
    s.player = setInterval(play, 1000 / s.videoFps);
  };
  const end = () => {
    ended = true; generating = false; s.arrivals = []; clearInterval(ticker); fps();
    el.querySelector(".behind").hidden = true;
  };
  const setState = (st) => { s.state = st; const b = el.querySelector(".state"); b.textContent = st; b.className = "state state-" + st; };

  const protocols = ["ff-engine"].concat(key() ? ["bearer." + key()] : []);
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime/video`, protocols);
  ws.binaryType = "blob";
  s.ws = ws;
  let pending = 0, numBlocks = 0;
  el.querySelector(".cancel").onclick = () => ws.readyState === 1 && ws.send(JSON.stringify({ type: "session.cancel", event_id: "cancel-1" }));
  ws.onopen = () => ws.send(JSON.stringify({ type: "session.start", event_id: "start-1", ...params }));
  ws.onmessage = async (msg) => {
    if (typeof msg.data !== "string") {
      if (pending <= 0) return;  // latents or an unexpected binary: not a frame
      pending -= 1;
      s.buffer.push(await createImageBitmap(msg.data));  // played at the video's fps by the play loop
      s.arrived += 1;
      return;
    }
    const ev = JSON.parse(msg.data);
    if (ev.type === "session.started") {
      numBlocks = ev.num_blocks; s.id = ev.session_id; setState("running"); startPlayer(ev.fps);
    }
    else if (ev.type === "control.received") { s.received.push(ev.event); showSteer(s); }
    else if (ev.type === "session.updated") {
      s.applied.push({ event: ev.event, block: ev.applies_at_block, changed: ev.changed }); showSteer(s);
    }
    else if (ev.type === "video.block") {
      pending = ev.frames; frameBlock = ev.frames; s.blocks = ev.block + 1; s.pagesHeld = ev.pages_held;
      show("blocks", `${s.blocks}/${numBlocks}`); show("pages", `${ev.pages_held}/${ev.pages_reserved}`);
    } else if (ev.type === "session.done") { setState(ev.state); end(); if (ev.error) fail(ev.error); ws.close(); }
    else if (ev.type === "error") { fail(ev.message); if (s.state === "starting") setState("error"); }
  };
  ws.onclose = async (e) => {
    end();
    if (s.state !== "running" && s.state !== "starting") return;
    let why = e.reason || `connection closed (code ${e.code})`;
    if (e.code === 1006) {  // a refused upgrade gives the page no reason: ask the REST API with the same key
      try { await api("/v1/models"); } catch (err) { why = err.message; }
    }
    setState(s.state === "starting" ? "error" : "closed");
    fail(why);
  };
  return s;
}

// ---- steering (a model with actions): arrow keys send session.update to the selected stream ----------------
const KEYS = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "stay", ArrowUp: "stay" };
const ARROWS = { left: "←", right: "→", stay: "↓" };

function select(s) {
  viewer.selected = s;
  for (const t of viewer.streams) t.el.classList.toggle("selected", t === s);
}

function showSteer(s) {
  const last = s.sent[s.sent.length - 1];
  if (!last) return;
  const applied = s.applied.find((a) => a.event === last.event);
  const what = last.paused !== undefined ? (last.paused ? "pause" : "play") : `${ARROWS[last.action] || ""} ${last.action}`.trim();
  s.el.querySelector(".steer").textContent = `${what} · received #${s.received.includes(last.event) ? last.event : "…"}` +
    (applied ? ` · applied at block ${applied.block}` : " · waiting for the next block");
}

function control(s, fields) {
  if (!s || !s.ws || s.ws.readyState !== 1 || s.state !== "running") return false;
  const event = s.sent.length + 1;  // the server numbers this connection's controls 1, 2, ... in order
  s.ws.send(JSON.stringify({ type: "session.update", event_id: `steer-${event}`, ...fields }));
  s.sent.push({ event, action: fields.actions ? fields.actions[0] : undefined, paused: fields.paused });
  showSteer(s);
  return true;
}

// Matrix-Game-style keyboard / mouse rows (GET /v1/models "conditioning": field -> row width): W S A D (or 1..7
// for a 7-key model) set the held key, a drag over the canvas the camera delta; each change sends one block's rows
// (4 pixel frames per latent frame: the model's VAE time compression), appended after what the stream holds.
const WSAD = ["w", "s", "a", "d"];

function conditioningRows(s) {
  const widths = (viewer.model && viewer.model.conditioning) || {};
  const n = 4 * viewer.model.frames_per_block, out = {};
  if (widths.keyboard_cond) {
    const row = new Array(widths.keyboard_cond).fill(0);
    if (s.key !== null && s.key < row.length) row[s.key] = 1;
    out.keyboard_cond = new Array(n).fill(row);
  }
  if (widths.mouse_cond) out.mouse_cond = new Array(n).fill([s.mouse[0], s.mouse[1]].concat(new Array(widths.mouse_cond - 2).fill(0)).slice(0, widths.mouse_cond));
  return out;
}

function steerRows(s, e) {
  const widths = (viewer.model && viewer.model.conditioning) || {};
  if (!widths.keyboard_cond) return false;
  const k = e.key.toLowerCase();
  const index = widths.keyboard_cond >= 7 ? "1234567".indexOf(k) : WSAD.slice(0, widths.keyboard_cond).indexOf(k);
  if (index < 0) return false;
  s.key = s.key === index ? null : index;  // a second press releases the key
  if (!control(s, { conditioning: conditioningRows(s) })) return false;
  s.sent[s.sent.length - 1].action = `key ${e.key.toUpperCase()}${s.key === null ? " released" : ""}`;
  showSteer(s);
  return true;
}

document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
  const actions = (viewer.model && viewer.model.actions) || [];
  const s = viewer.selected;
  if (s && steerRows(s, e)) { e.preventDefault(); return; }
  if (KEYS[e.key] && actions.includes(KEYS[e.key])) {
    if (control(s, { actions: [KEYS[e.key]] })) { s.paused = false; e.preventDefault(); }
  } else if (e.key === " " && actions.length && s) {
    if (control(s, { paused: !s.paused })) { s.paused = !s.paused; e.preventDefault(); }
  }
});
viewer.control = control;

$("start-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const m = viewer.model || {};
  const params = {
    policy: $("policy").value || "window",
    budget_frames: parseInt($("budget").value, 10),
    seconds: parseFloat($("seconds").value),
    seed: parseInt($("seed").value, 10),
    slow_client: $("slow").value,
  };
  if ((m.actions || []).length) params.actions = [m.actions.includes("stay") ? "stay" : m.actions[0]];
  if (m.default_prefix_frames > 0 && $("prefix").checked) params.prefix_frames = m.default_prefix_frames;
  if (Object.keys(m.conditioning || {}).length) {  // the first block's rows: no key held, the camera still
    const rows = conditioningRows({ key: null, mouse: [0, 0] });
    for (const f in rows) rows[f] = rows[f].slice(0, 1 + 4 * (m.frames_per_block - 1));
    params.conditioning = rows;
  }
  startStream(params);
});
$("key").addEventListener("change", init);
init();
