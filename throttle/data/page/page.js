// The live page: polls /api/flows once a second (only the points after the last one it has), keeps
// each flow's last two minutes, and draws them on canvases; Pause stops polling and drawing, so the
// picture stays as it is while the class talks over it.
"use strict";

const CARDS = 8; // flows charted; the table lists every flow the censor shows
const COLOURS = { upload: "#0072B2", download: "#E69F00", rate: "#000000", grid: "#bdbdbd", text: "#000000" };
const state = { seq: 0, window: 120, flows: new Map(), order: [], paused: false, timer: null };

function fmtSpeed(bytesPerSecond) {
  if (bytesPerSecond === null || bytesPerSecond === undefined) return "no limit";
  const bits = bytesPerSecond * 8;
  if (bits >= 1e6) return (bits / 1e6).toFixed(bits >= 1e7 ? 0 : 1) + " Mbit/s";
  if (bits >= 1e3) return (bits / 1e3).toFixed(0) + " kbit/s";
  return bits.toFixed(0) + " bit/s";
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function merge(data) {
  if (data.seq < state.seq) state.flows.clear(); // the censor started again: begin anew
  state.seq = data.seq;
  state.window = data.window;
  const keep = new Map();
  for (const f of data.flows) {
    const old = state.flows.get(f.id);
    const points = old ? old.points : new Map();
    for (const [seq, up, down] of f.history) points.set(seq, [up, down]);
    for (const seq of points.keys()) if (seq <= data.seq - data.window) points.delete(seq);
    keep.set(f.id, { meta: f, points });
  }
  state.flows = keep;
  state.order = data.flows.map((f) => f.id);
}

function header(data) {
  const s = data.scenario;
  document.getElementById("title").textContent = s.title || s.name || "throttle";
  document.title = "throttle: " + (s.title || s.name);
  const sources = document.getElementById("sources");
  sources.replaceChildren();
  sources.title = s.sources.join("\n");
  if (s.name) sources.append(el("span", {}, s.name + (s.sources.length ? " \u00b7 sources: " : "")));
  s.sources.forEach((src, i) => {
    const link = /^https?:/.test(src) ? el("a", { href: src }, "[" + (i + 1) + "]") : el("span", {}, src);
    if (/^https?:/.test(src)) link.title = src;
    sources.append(link, " ");
  });
  document.getElementById("count-limited").textContent = data.counts.limited;
  document.getElementById("count-passed").textContent = data.counts.passed;
  document.getElementById("shown").textContent =
    "(" + data.counts.shown + " shown, the most recent " + data.cap + " at most; " +
    data.counts.active_limited + " limited and " + data.counts.active_passed + " passed in the censor's table now)";
}

function draw(canvas, flow) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 560, height = canvas.clientHeight || 200;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const left = 8, right = width - 8, top = 22, bottom = height - 22;
  const limits = flow.meta.limit;
  let top_value = 1;
  for (const [up, down] of flow.points.values()) top_value = Math.max(top_value, up, down);
  for (const d of ["upload", "download"]) if (limits[d] !== null) top_value = Math.max(top_value, limits[d]);
  top_value *= 1.15;
  const x = (seq) => left + (right - left) * (1 - (state.seq - seq) / (state.window - 1));
  const y = (v) => bottom - (bottom - top) * (v / top_value);
  g.strokeStyle = COLOURS.grid;
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(left, bottom);
  g.lineTo(right, bottom);
  g.stroke();
  g.fillStyle = COLOURS.text;
  g.font = "16px system-ui, sans-serif";
  g.fillText("\u2212" + state.window + " s", left, height - 4);
  g.fillText("now", right - 30, height - 4);
  g.fillText(fmtSpeed(top_value / 1.15) + " max", left, 16);
  const shown = new Set();
  for (const d of ["upload", "download"]) {
    const rate = limits[d];
    if (rate === null || shown.has(rate)) continue;
    shown.add(rate);
    g.strokeStyle = COLOURS.rate;
    g.lineWidth = 2;
    g.setLineDash([10, 6]);
    g.beginPath();
    g.moveTo(left, y(rate));
    g.lineTo(right, y(rate));
    g.stroke();
    g.setLineDash([]);
    const label = "rule's rate " + fmtSpeed(rate);
    const w = g.measureText(label).width;
    g.fillStyle = "rgba(255, 255, 255, 0.85)"; // the label stays readable over the lines
    g.fillRect(right - w - 8, y(rate) - 24, w + 8, 20);
    g.fillStyle = COLOURS.text;
    g.fillText(label, right - w - 4, y(rate) - 9);
  }
  const seqs = [...flow.points.keys()].sort((a, b) => a - b);
  // Each second thin, the mean of the last 5 s thick: a policer's bursts land in one second or
  // the next, so single seconds swing between 0 and twice the rate around the line.
  const line = (values, i) => {
    g.beginPath();
    seqs.forEach((seq, n) => {
      const v = values(n, i);
      if (n === 0) g.moveTo(x(seq), y(v)); else g.lineTo(x(seq), y(v));
    });
    g.stroke();
  };
  const second = (n, i) => flow.points.get(seqs[n])[i];
  const mean = (n, i) => {
    let sum = 0, k = 0;
    for (let m = Math.max(0, n - 4); m <= n; m++, k++) sum += second(m, i);
    return sum / k;
  };
  [["upload", 0, []], ["download", 1, [4, 4]]].forEach(([d, i, dash]) => {
    g.strokeStyle = COLOURS[d];
    g.setLineDash(dash);
    g.globalAlpha = 0.45;
    g.lineWidth = 1.5;
    line(second, i);
    g.globalAlpha = 1;
    g.lineWidth = 4;
    line(mean, i);
  });
  g.setLineDash([]);
}

function active(flow) {
  return flow.meta.speed.upload + flow.meta.speed.download > 0;
}

function cards() {
  const flows = state.order.map((id) => state.flows.get(id));
  // the flows moving now first (newest decision first), then the rest
  const chosen = flows.filter(active).concat(flows.filter((f) => !active(f))).slice(0, CARDS);
  const main = document.getElementById("cards");
  main.replaceChildren();
  for (const flow of chosen) {
    const f = flow.meta;
    const card = el("section", {
      class: "flow " + f.verdict + (f.ended ? " ended" : ""), "data-name": f.name, "data-rule": f.rule,
      "data-verdict": f.verdict, "data-upload-bps": f.speed.upload, "data-download-bps": f.speed.download,
    });
    card.append(el("h3", {}, f.name || "(no name)"));
    const meta = el("p", { class: "meta" });
    meta.append(el("span", { class: "badge " + f.verdict }, f.verdict), " rule " + f.rule +
      (f.verdict === "limited" ? " (" + f.action + ")" : "") + " \u00b7 " + f.transport + " " + f.client +
      " \u2192 " + f.server + (f.ended ? " \u00b7 ended" : ""));
    card.append(meta);
    const speeds = el("div", { class: "speeds" });
    speeds.append(el("span", { class: "upload" }, "\u2191 " + fmtSpeed(f.speed.upload)),
      el("span", { class: "download" }, "\u2193 " + fmtSpeed(f.speed.download)));
    card.append(speeds);
    const canvas = el("canvas", { role: "img", "aria-label": "speed of " + f.name + " over the last two minutes" });
    card.append(canvas);
    main.append(card);
    draw(canvas, flow);
  }
}

function table() {
  const body = document.querySelector("#flows tbody");
  body.replaceChildren();
  for (const id of state.order) {
    const f = state.flows.get(id).meta;
    const row = el("tr", {
      class: f.verdict, "data-name": f.name, "data-rule": f.rule, "data-verdict": f.verdict,
      "data-upload-bps": f.speed.upload, "data-download-bps": f.speed.download,
    });
    row.append(el("td", {}, f.name || "(no name)"), el("td", {}, f.rule), el("td", {}, f.verdict),
      el("td", {}, f.client + " \u2192 " + f.server), el("td", { class: "num" }, fmtSpeed(f.speed.upload)),
      el("td", { class: "num" }, fmtSpeed(f.speed.download)));
    body.append(row);
  }
}

async function poll() {
  state.timer = null;
  if (state.paused) return;
  const status = document.getElementById("status");
  try {
    const response = await fetch("api/flows?since=" + state.seq, { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    if (state.paused) return; // paused while the answer was on its way: keep the frozen picture
    merge(data);
    header(data);
    cards();
    table();
    status.className = "status";
    status.textContent = "live \u00b7 updated " + new Date().toLocaleTimeString();
  } catch (err) {
    status.className = "status";
    status.textContent = "cannot reach the censor (" + err.message + "); trying again";
  }
  schedule();
}

function schedule() {
  if (!state.paused && state.timer === null) state.timer = setTimeout(poll, 1000);
}

function togglePause() {
  state.paused = !state.paused;
  const button = document.getElementById("pause");
  button.textContent = state.paused ? "Resume" : "Pause";
  button.setAttribute("aria-pressed", String(state.paused));
  const status = document.getElementById("status");
  if (state.paused) {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    status.className = "status paused";
    status.textContent = "PAUSED: the picture is frozen (Resume or the space bar goes on)";
  } else {
    poll();
  }
}

document.getElementById("pause").addEventListener("click", togglePause);
document.addEventListener("keydown", (event) => {
  if (event.code === "Space" && event.target === document.body) {
    event.preventDefault();
    togglePause();
  }
});
poll();
