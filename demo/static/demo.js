// The live attack demo's page: reads /config once, then server-sent events from /events; changes go to /control.
// Plain JavaScript and canvas, nothing from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const ATTACK_COLOURS = ["#f0883e", "#a371f7", "#3fb950", "#58a6ff"];
const STAGE_COLOURS = ["#8b949e", "#58a6ff", "#a371f7", "#d29922", "#f0883e", "#3fb950", "#db61a2", "#79c0ff"];
const WINDOW_S = 30; // the plots show the last WINDOW_S seconds
const STAGE_HISTORY = 100;

let config = null;
let current = null; // the frame on screen
let reconstructions = 0; // frames reconstructed and scored since the page opened
let connectionLost = false;
let shownNotice = null;
const points = []; // plot points, oldest first: {t, split, latency} or {t, split, ssim: {attack: value}}
const stageHistory = []; // the stage times of the last frames
const drawnAt = []; // when the page drew each recent frame, for its own rate
const attackedAt = []; // [time, attacked so far], for the attacker's rate

// Pictures.

function bytesOf(b64) {
  const text = atob(b64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

function colourTable(stops) {
  const table = new Uint8Array(256 * 3);
  for (let i = 0; i < 256; i++) {
    const at = (i / 255) * (stops.length - 1);
    const k = Math.min(Math.floor(at), stops.length - 2);
    const f = at - k;
    for (let c = 0; c < 3; c++) table[3 * i + c] = Math.round(stops[k][c] * (1 - f) + stops[k + 1][c] * f);
  }
  return table;
}
const VIRIDIS = colourTable([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]);

// Draws a width x height picture, filled in by `fill(rgba)`, scaled to the whole canvas with sharp pixels.
function paint(canvas, width, height, fill) {
  if (!canvas.scratch || canvas.scratch.width !== width || canvas.scratch.height !== height) {
    canvas.scratch = document.createElement("canvas");
    canvas.scratch.width = width;
    canvas.scratch.height = height;
  }
  const scratch = canvas.scratch.getContext("2d");
  const pixels = scratch.createImageData(width, height);
  fill(pixels.data);
  scratch.putImageData(pixels, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(canvas.scratch, 0, 0, canvas.width, canvas.height);
}

function drawImage(canvas, image) {
  const [h, w, c] = image.shape;
  const src = bytesOf(image.data);
  paint(canvas, w, h, (rgba) => {
    for (let i = 0; i < h * w; i++) {
      for (let k = 0; k < 3; k++) rgba[4 * i + k] = src[c * i + (c === 1 ? 0 : k)];
      rgba[4 * i + 3] = 255;
    }
  });
}

function drawBlank(canvas, text) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#2c333d";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!text) return;
  ctx.fillStyle = "#9aa4b2";
  ctx.font = "13px system-ui, sans-serif";
  ctx.textAlign = "center";
  text.split("\n").forEach((line, i, lines) => {
    ctx.fillText(line, canvas.width / 2, canvas.height / 2 + 18 * (i - (lines.length - 1) / 2));
  });
  ctx.textAlign = "start";
}

function drawHeatmaps(activation) {
  const [k, h, w] = activation.maps.shape;
  const src = bytesOf(activation.maps.data);
  const box = $("heatmaps");
  while (box.children.length < k) box.appendChild(document.createElement("canvas"));
  while (box.children.length > k) box.lastChild.remove();
  [...box.children].forEach((canvas, m) => {
    canvas.width = canvas.height = 92;
    canvas.title = `channel ${activation.channels[m]}`;
    paint(canvas, w, h, (rgba) => {
      for (let i = 0; i < h * w; i++) {
        const v = src[m * h * w + i];
        rgba.set(VIRIDIS.subarray(3 * v, 3 * v + 3), 4 * i);
        rgba[4 * i + 3] = 255;
      }
    });
  });
}

// Plots.

function plot(canvas, series, { yMax, guide, unit }) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, left = 40, bottom = 20, top = 8, right = 8;
  ctx.clearRect(0, 0, W, H);
  const tNow = points.length ? points[points.length - 1].t : 0;
  const x = (t) => left + ((t - (tNow - WINDOW_S)) / WINDOW_S) * (W - left - right);
  const y = (v) => H - bottom - (Math.min(v, yMax) / yMax) * (H - bottom - top);
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#2c333d";
  ctx.fillStyle = "#9aa4b2";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    ctx.beginPath();
    ctx.moveTo(left, y(v));
    ctx.lineTo(W - right, y(v));
    ctx.stroke();
    ctx.fillText(yMax >= 10 ? v.toFixed(0) : v.toFixed(2), 4, y(v) + 4);
  }
  ctx.fillText(`last ${WINDOW_S} s${unit ? " · " + unit : ""}`, left, H - 5);
  if (guide !== undefined) {
    ctx.setLineDash([4, 4]);
    ctx.strokeStyle = "#d29922";
    ctx.beginPath();
    ctx.moveTo(left, y(guide));
    ctx.lineTo(W - right, y(guide));
    ctx.stroke();
    ctx.setLineDash([]);
  }
  // Where the split point changed.
  let split = null;
  ctx.fillStyle = "#e6e9ee";
  for (const p of points) {
    if (p.split !== split && p.t >= tNow - WINDOW_S) {
      ctx.strokeStyle = "#58a6ff";
      ctx.beginPath();
      ctx.moveTo(x(p.t), top);
      ctx.lineTo(x(p.t), H - bottom);
      ctx.stroke();
      ctx.fillText(p.split, x(p.t) + 3, top + 10);
    }
    split = p.split;
  }
  for (const s of series) {
    ctx.strokeStyle = ctx.fillStyle = s.colour;
    ctx.beginPath();
    let first = true;
    for (const [t, v] of s.values) {
      if (t < tNow - WINDOW_S || v === null) continue;
      first ? ctx.moveTo(x(t), y(v)) : ctx.lineTo(x(t), y(v));
      first = false;
    }
    ctx.stroke();
    if (s.label) ctx.fillText(`― ${s.label}`, W - right - 90 * (s.index + 1), H - 5); // the legend, under the plot
  }
}

function drawPlots() {
  const attacks = Object.keys(config.attacks);
  const ssim = attacks.map((name, index) => ({
    label: name,
    index,
    colour: ATTACK_COLOURS[index % ATTACK_COLOURS.length],
    values: points.filter((p) => p.ssim && name in p.ssim).map((p) => [p.t, p.ssim[name]]),
  }));
  // The guide is splitleak.core.facts.RECOGNISABLE_SSIM (He, Zhang and Lee, ACSAC 2019), sent in the config.
  plot($("ssim-plot"), ssim, { yMax: 1, guide: config.recognisable_ssim });
  const latency = points.filter((p) => p.latency !== undefined).map((p) => [p.t, p.latency]);
  const recent = latency.filter(([t]) => t >= (points.length ? points[points.length - 1].t : 0) - WINDOW_S);
  const high = recent.reduce((most, [, v]) => Math.max(most, v), 0);
  const yMax = Math.max(20, Math.ceil((high * 1.1) / 20) * 20);
  plot($("latency-plot"), [{ colour: "#58a6ff", values: latency }], { yMax, unit: "ms" });
}

function drawStages(record) {
  const stages = config.stages;
  stageHistory.push(record);
  if (stageHistory.length > STAGE_HISTORY) stageHistory.shift();
  const median = (stage) => {
    const values = stageHistory.map((r) => r[`${stage}_ms`]).filter((v) => v !== undefined).sort((a, b) => a - b);
    return values.length ? values[Math.floor(values.length / 2)] : 0;
  };
  const last = stages.map((stage) => Math.max(0, record[`${stage}_ms`] || 0));
  const total = last.reduce((a, b) => a + b, 0) || 1;
  const canvas = $("stages"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  let at = 0;
  last.forEach((v, i) => {
    ctx.fillStyle = STAGE_COLOURS[i % STAGE_COLOURS.length];
    ctx.fillRect((at / total) * canvas.width, 0, (v / total) * canvas.width + 0.5, canvas.height);
    at += v;
  });
  $("stage-table").innerHTML = stages
    .map(
      (stage, i) =>
        `<tr><td><span class="swatch" style="background:${STAGE_COLOURS[i % STAGE_COLOURS.length]}"></span></td>` +
        `<td>${stage}</td><td>${last[i].toFixed(2)}</td><td>${median(stage).toFixed(2)}</td></tr>`,
    )
    .join("");
}

// What the page shows.

function attackCard(name, index) {
  const card = document.createElement("section");
  card.className = "card attack";
  card.dataset.attack = name;
  card.innerHTML =
    `<h2>Reconstruction <small style="color:${ATTACK_COLOURS[index % ATTACK_COLOURS.length]}">${name}</small></h2>` +
    `<canvas width="192" height="192"></canvas><p class="scores"></p><p class="caption label"></p>` +
    `<div class="who" hidden><canvas width="48" height="48"></canvas><span></span></div>` +
    `<p class="caption who-note" hidden>attacker's guess of who this is: not available (see above)</p>` +
    `<p class="caption" title="what this attacker knows">${config.attacks[name].knowledge}</p>`;
  drawBlank(card.querySelector("canvas"));
  return card;
}

function showFrame(frame) {
  const isNew = !current || current.device_send_ns !== frame.device_send_ns;
  current = frame;
  $("live").dataset.split = frame.split;
  if (frame.original) drawImage($("original"), frame.original);
  $("frame-caption").textContent = `frame ${frame.frame_id ?? "?"} of ${config.dataset}`;
  if (config.people && frame.identity !== null) $("frame-caption").textContent += ` · ${person(frame.identity)}`;
  drawHeatmaps(frame.activation);
  const shape = frame.activation.shape.join("×");
  const defence = frame.defence === "none" ? "no defence" : `${frame.defence} at ${Number(frame.strength).toFixed(2)}`;
  $("activation-caption").textContent = `at ${frame.split}: ${shape}, channels ${frame.activation.channels.join(", ")}`;
  $("activation-caption").textContent += ` · ${defence}`;
  const record = frame.record;
  $("prediction").textContent = record ? record.prediction ?? "refused" : "…";
  $("truth").textContent = record && record.label ? `truth: ${record.label}` : "";
  for (const card of document.querySelectorAll(".attack")) {
    const name = card.dataset.attack;
    const result = frame.attacks[name];
    const scores = card.querySelector(".scores"), label = card.querySelector(".label");
    card.querySelector(".who-note").hidden = !config.identity_note || !result;
    if (!result) {
      // Switched off on the page, or never trained for this split point: say which, never a silent blank.
      const exported = name in config.attacks && frame.split in config.attacks[name].held_out;
      drawBlank(card.querySelector("canvas"), exported ? "switched off" : `not available\nat ${frame.split}`);
      card.querySelector(".who").hidden = true;
      card.classList.toggle("unavailable", !exported);
      scores.textContent = exported
        ? "switched off"
        : `${name} is not available at ${frame.split}: no ${name} was trained for this split point ` +
          `(it has one for ${Object.keys(config.attacks[name].held_out).join(", ")})`;
      label.textContent = "";
      continue;
    }
    card.classList.remove("unavailable");
    drawImage(card.querySelector("canvas"), result.image);
    showGuess(card.querySelector(".who"), result.identity, frame.identity);
    scores.textContent =
      result.ssim === null ? "no original to score against" : `PSNR ${result.psnr.toFixed(1)} dB · SSIM ${result.ssim.toFixed(3)}`;
    if (result.same === undefined) {
      label.textContent = `cloud would say: ${result.label}`;
      label.className = "caption label";
    } else {
      label.textContent = `cloud would say: ${result.label} · ${result.same ? "same as for the frame" : "differs"}`;
      label.className = `caption label ${result.same ? "same" : "different"}`;
    }
  }
  const leaks = Object.entries(frame.attacks).filter(([, r]) => r.same !== undefined);
  $("agreement").textContent = leaks.length
    ? leaks.map(([name, r]) => `${name}'s reconstruction gets ${r.same ? "the same label" : "another label"}`).join(" · ")
    : "";
  if (record) drawStages(record);
  if (isNew && Object.values(frame.attacks).some((r) => r.ssim !== null)) {
    reconstructions += 1;
    $("live").dataset.reconstructions = reconstructions;
  }
  drawnAt.push(performance.now());
}

function person(identity) {
  return `person ${config.people[identity].name}`;
}

// Faces: whom the attacker takes the reconstruction for (the nearest photo in its gallery), and whether it is right.
function showGuess(box, guess, truth) {
  box.hidden = guess === null || guess === undefined || !config.people;
  if (box.hidden) return;
  drawImage(box.querySelector("canvas"), config.people[guess].photo);
  const right = guess === truth;
  box.querySelector("span").textContent = `attacker's guess: ${person(guess)} · ${right ? "right" : "wrong"}`;
  box.className = `who ${right ? "same" : "different"}`;
}

function rate(times, now) {
  while (times.length && times[0] < now - 2000) times.shift();
  return times.length / 2;
}

function showStatus(status) {
  for (const li of document.querySelectorAll("#processes li")) {
    const process = status.processes[li.dataset.role];
    li.className = process && process.running ? "running" : process ? "stopped" : "";
    li.title = process ? `pid ${process.pid}${process.exit ? ", " + process.exit : ""}` : "";
  }
  const message = connectionLost
    ? "Lost the connection to the demo server: it has stopped. Start `splitleak demo` again."
    : status.message;
  $("banner").hidden = !message;
  $("banner").textContent = message || "";
  $("live").classList.toggle("stopped", Boolean(message));
  $("notice").textContent = status.notice || "";
  if (status.notice && status.notice !== shownNotice && current) resetControls(current); // the device said no
  shownNotice = status.notice;
  const now = performance.now();
  const attacked = status.counts.attacked || 0;
  attackedAt.push([now, attacked]);
  while (attackedAt.length > 1 && attackedAt[0][0] < now - 2000) attackedAt.shift();
  const [t0, n0] = attackedAt[0];
  const attackRate = now > t0 ? ((attacked - n0) * 1000) / (now - t0) : 0;
  const record = current && current.record;
  const split = current ? config.splits[current.split] : null;
  const rows = [
    ["bytes per frame, up", record ? `${(record.bytes_up / 1024).toFixed(1)} KiB` : "–"],
    ["activation as float32", split ? `${(split.bytes / 1024).toFixed(1)} KiB` : "–"],
    ["bytes per frame, down", record ? `${record.bytes_down} B` : "–"],
    ["link", record ? record.link : "–"],
    ["device frames/s", status.device_fps.toFixed(1)],
    ["reconstructions/s", attackRate.toFixed(1)],
    ["page updates/s", rate(drawnAt, now).toFixed(1)],
    ["intercepted", status.counts.intercepted || 0],
    ["skipped by the attacker", status.counts.skipped || 0],
  ];
  $("numbers").innerHTML = rows.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("");
}

function update(message) {
  for (const p of message.points) points.push(p);
  while (points.length && points[0].t < points[points.length - 1].t - 2 * WINDOW_S) points.shift();
  if (message.frame) showFrame(message.frame);
  showStatus(message.status);
  drawPlots();
}

// Controls.

function options(select, entries) {
  select.innerHTML = entries.map(([value, text]) => `<option value="${value}">${text}</option>`).join("");
}

// The slider is what the defence's class declares: its stretch, step and where it starts (none: nothing to choose).
function strengthFor(name, strength) {
  const { slider, default: fallback } = config.defences[name];
  const input = $("strength");
  $("strength-control").hidden = !slider;
  if (!slider) return fallback ?? 0;
  [input.min, input.max, input.step] = [slider.low, slider.high, slider.step];
  input.value = strength ?? slider.start;
  $("strength-value").textContent = Number(input.value).toFixed(2);
  return Number(input.value);
}

function resetControls(frame) {
  $("split").value = frame.split;
  if ($("defence").value !== frame.defence) {
    $("defence").value = frame.defence;
    strengthFor(frame.defence, Number(frame.strength));
  }
}

async function send(change) {
  $("notice").textContent = "";
  try {
    const response = await fetch("/control", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(change),
    });
    if (!response.ok) $("notice").textContent = (await response.json()).error;
  } catch (e) {
    $("notice").textContent = `could not reach the demo server: ${e}`;
  }
}

function buildControls() {
  $("model").textContent = `${config.model} · frames from ${config.dataset}`;
  $("identity-note").hidden = !config.identity_note;
  $("identity-note").textContent = config.identity_note || "";
  $("wire").hidden = !config.wire;
  $("wire").textContent = config.wire || "";
  // Under TLS the proxy intercepts nothing readable: the activation shown is the one the curious cloud received.
  if (config.wire) $("activation-title").textContent = "Activation the cloud received";
  $("recognisable-ssim").textContent = config.recognisable_ssim;
  const splits = Object.entries(config.splits);
  const attacked = (split) => Object.values(config.attacks).some((a) => split in a.held_out);
  const splitText = (name, s) => `${name} (${s.shape.join("×")})${attacked(name) ? "" : " · no attack trained"}`;
  options($("split"), splits.map(([name, s]) => [name, splitText(name, s)]));
  options($("link"), Object.entries(config.links));
  options($("device"), Object.entries(config.devices));
  options($("defence"), Object.keys(config.defences).map((name) => [name, name]));
  $("split").value = config.start.split;
  $("link").value = config.start.link;
  $("device").value = config.start.device;
  $("defence").value = config.start.defence;
  strengthFor(config.start.defence, config.start.strength);
  $("split").onchange = () => send({ split: $("split").value });
  $("link").onchange = () => send({ link: $("link").value });
  $("device").onchange = () => send({ device: $("device").value });
  $("defence").onchange = () => {
    const name = $("defence").value;
    $("defence").title = config.defences[name].means;
    send({ defence: name, strength: strengthFor(name, null) });
  };
  $("strength").oninput = () => ($("strength-value").textContent = Number($("strength").value).toFixed(2));
  $("strength").onchange = () => send({ strength: Number($("strength").value) });
  const box = $("attacks");
  Object.keys(config.attacks).forEach((name, index) => {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" value="${name}" checked> ${name}`;
    label.title = config.attacks[name].knowledge;
    box.appendChild(label);
    $("reconstructions").appendChild(attackCard(name, index));
  });
  if (!Object.keys(config.attacks).length) box.append(" none exported for this model");
  box.onchange = () => send({ attacks: [...box.querySelectorAll("input:checked")].map((i) => i.value) });
  drawBlank($("original"));
}

async function start() {
  config = await (await fetch("/config")).json();
  buildControls();
  const events = new EventSource("/events");
  let lastStatus = null;
  events.onmessage = (event) => {
    connectionLost = false;
    const message = JSON.parse(event.data);
    lastStatus = message.status;
    update(message);
  };
  events.onerror = () => {
    connectionLost = true;
    if (lastStatus) showStatus(lastStatus);
  };
}

start();
