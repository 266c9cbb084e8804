// rf-serve viewer: one session, over a WebSocket (/v1/stream, JPEG frames) or WebRTC (/v1/webrtc/offer,
// a video track and a data channel), frames drawn on a canvas as they arrive.
// Protocol: docs/serving.md. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("screen"), ctx = canvas.getContext("2d");
const viewer = { state: "idle", framesDrawn: 0, chunks: 0, dropped: 0, promptChanges: [], errors: [] };
window.rfViewer = viewer;  // for tests and the console
let ws = null, arrivals = [];  // ws: the open session's channel (a WebSocket or an RTCDataChannel)
let pc = null;  // the WebRTC peer connection, when the transport is WebRTC

function setState(state, text) {
  viewer.state = state;
  const el = $("status");
  el.className = "state-" + state;
  el.textContent = text;
  const live = state === "starting" || state === "streaming";
  $("start").disabled = live || state === "connecting";
  $("stop").disabled = !live;
  $("switch-button").disabled = state !== "streaming";
}

function log(text) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  $("log").prepend(li);
  while ($("log").children.length > 50) $("log").lastChild.remove();
}

function wsUrl() {
  const url = new URL("v1/stream", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(window.location.search).get("token");
  url.search = token ? "?token=" + encodeURIComponent(token) : "";
  return url.href;
}

async function drawFrame(data) {
  const view = new DataView(data);
  if (data.byteLength < 28 || view.getUint8(0) !== 82 || view.getUint8(1) !== 70) return;  // "RF"
  const headerLength = view.getUint8(3);
  const chunk = view.getUint32(4, true), frame = view.getUint32(8, true);
  const made = view.getFloat64(12, true);
  const bitmap = await createImageBitmap(new Blob([data.slice(headerLength)], { type: "image/jpeg" }));
  draw(bitmap, bitmap.width, bitmap.height);
  bitmap.close();
  $("delivery").textContent = Math.max(0, Date.now() - made * 1000).toFixed(0) + " ms";
  $("chunk").textContent = chunk + " (frame " + frame + ")";
}

function draw(image, width, height) {
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width; canvas.height = height;
  }
  ctx.drawImage(image, 0, 0);
  viewer.framesDrawn += 1;
  const now = performance.now();
  arrivals.push(now);
  while (arrivals.length && arrivals[0] < now - 2000) arrivals.shift();
  const fps = arrivals.length > 1 ? (arrivals.length - 1) / ((now - arrivals[0]) / 1000) : 0;
  $("fps").textContent = fps.toFixed(1);
  $("frames-drawn").textContent = viewer.framesDrawn;
  if (viewer.state === "starting") setState("streaming", "streaming");
}

function onEvent(msg) {
  switch (msg.type) {
    case "started":
      $("current-prompt").textContent = msg.prompt;
      log("started: " + msg.width + "x" + msg.height + " at " + msg.fps + " fps, seed " + msg.seed);
      break;
    case "chunk":
      viewer.chunks += 1;
      viewer.dropped = msg.dropped_frames;
      $("chunk-latency").textContent = (msg.seconds * 1000).toFixed(0) + " ms";
      if (pc) $("chunk").textContent = msg.index + " (frame " + msg.start_frame + ")";
      $("dropped").textContent = msg.dropped_frames;
      break;
    case "prompt_changed":
      viewer.promptChanges.push(msg);
      $("current-prompt").textContent = msg.prompt;
      log("prompt changed at chunk " + msg.chunk + ": " + msg.prompt);
      break;
    case "resumed":
      log("resumed on another replica from chunk " + msg.from_chunk + " (" + msg.reason + ")");
      break;
    case "error":
      viewer.errors.push(msg);
      log("error (" + msg.code + "): " + msg.message);
      if (msg.code === "server_full") setState("full", "server full: " + msg.message);
      else if (msg.code === "unauthorized") setState("unauthorized", msg.message);
      else if (msg.code === "stream_failed" || msg.code === "internal") setState("error", msg.message);
      break;
    case "ended":
      $("dropped").textContent = msg.dropped_frames;
      log("ended (" + msg.reason + "), " + msg.frames_sent + " frames sent, " + msg.dropped_frames + " dropped");
      if (viewer.state !== "error") setState("ended", "ended: " + msg.reason);
      break;
  }
}

function start() {
  const prompt = $("prompt").value;
  const seed = parseInt($("seed").value || "0", 10);
  const startMessage = JSON.stringify({ type: "start", prompt, seed, paced: $("paced").checked });
  if (ws && (ws.readyState === WebSocket.OPEN || ws.readyState === "open")) {  // an ended session: start again on it
    viewer.framesDrawn = 0;
    setState("starting", "starting…");
    ws.send(startMessage);
    return;
  }
  setState("connecting", "connecting…");
  if ($("transport").value === "webrtc") { startWebRTC(startMessage); return; }
  ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { setState("starting", "starting…"); ws.send(startMessage); };
  ws.onmessage = (e) => {
    if (typeof e.data === "string") onEvent(JSON.parse(e.data));
    else drawFrame(e.data);
  };
  ws.onerror = () => log("connection error");
  ws.onclose = (e) => {
    ws = null;
    if (e.code === 1013) setState("full", "server full: " + (e.reason || "try again later"));
    else if (e.code === 1008) setState("unauthorized", "refused: " + (e.reason || "unauthorized"));
    else if (viewer.state === "full" || viewer.state === "unauthorized" || viewer.state === "error") { /* keep */ }
    else if (viewer.state === "ended") setState("ended", $("status").textContent + " (disconnected)");
    else setState("error", "disconnected (" + e.code + (e.reason ? ": " + e.reason : "") + ")");
  };
}

// WebRTC: the frames come on a video track, drawn onto the canvas as each is presented; the session's
// messages and events travel on a data channel, exactly as on the WebSocket.
async function startWebRTC(startMessage) {
  const video = $("rtc-video");
  pc = new RTCPeerConnection();
  const channel = pc.createDataChannel("rf-serve");
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (e) => {
    video.srcObject = new MediaStream([e.track]);
    const onFrame = () => {
      if (!pc) return;
      draw(video, video.videoWidth, video.videoHeight);
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  };
  channel.onopen = () => { ws = channel; setState("starting", "starting…"); channel.send(startMessage); };
  channel.onmessage = (e) => onEvent(JSON.parse(e.data));
  channel.onclose = () => closedWebRTC();
  pc.onconnectionstatechange = () => {
    if (pc && (pc.connectionState === "failed" || pc.connectionState === "closed")) closedWebRTC();
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {  // the whole offer, every candidate in it (the server does not trickle)
      if (pc.iceGatheringState === "complete") return done();
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") done(); };
    });
    const token = new URLSearchParams(window.location.search).get("token");
    const reply = await fetch("v1/webrtc/offer", {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, token ? { Authorization: "Bearer " + token } : {}),
      body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }),
    });
    const answer = await reply.json();
    if (!reply.ok) {
      viewer.errors.push({ code: answer.code, message: answer.error });
      log("error (" + (answer.code || reply.status) + "): " + answer.error);
      if (reply.status === 503) setState("full", "server full: " + answer.error);
      else if (reply.status === 401) setState("unauthorized", answer.error);
      else setState("error", answer.error);
      pc.close(); pc = null;
      return;
    }
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  } catch (err) {
    setState("error", "WebRTC failed: " + err);
    if (pc) { pc.close(); pc = null; }
  }
}

function closedWebRTC() {
  if (!pc) return;
  pc.close(); pc = null; ws = null;
  if (viewer.state === "ended") setState("ended", $("status").textContent + " (disconnected)");
  else if (viewer.state !== "full" && viewer.state !== "unauthorized" && viewer.state !== "error") {
    setState("error", "disconnected");
  }
}

// leaving the page closes the peer connection, so the server frees the session at once (not after
// ICE's consent time-out, ~30 s)
window.addEventListener("pagehide", () => { if (pc) pc.close(); });

$("controls").addEventListener("submit", (e) => { e.preventDefault(); start(); });
$("stop").addEventListener("click", () => { if (ws) ws.send(JSON.stringify({ type: "stop" })); });
$("switch").addEventListener("submit", (e) => {
  e.preventDefault();
  if (ws && viewer.state === "streaming") {
    ws.send(JSON.stringify({ type: "prompt", prompt: $("next-prompt").value }));
    log("asked to switch to: " + $("next-prompt").value);
  }
});

fetch("v1/info" + window.location.search).then(async (r) => {
  if (r.status === 401) { setState("unauthorized", "unauthorized: open this page with ?token=..."); return; }
  const info = await r.json();
  if (info.webrtc) $("transport").querySelector("option[value=webrtc]").disabled = false;
  $("model").textContent = info.width + "x" + info.height + " at " + info.fps + " fps, " + info.engine +
    ", up to " + info.max_sessions + " sessions";
}).catch(() => setState("error", "the server cannot be reached"));
