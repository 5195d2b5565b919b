// The page of `gptlab serve`: a chat that streams from /v1/chat/completions (for a run with
// a chat template), a playground that streams from /v1/completions, and a run view drawn
// from /v1/run (the run's metrics.jsonl). No libraries, no network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("gptlab-api-key") || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function responseError(response) {
  // the server's error (OpenAI's shape: message, code) as an Error to throw
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch (e) {}
  const failure = new Error(error.message || response.status + " " + response.statusText);
  failure.code = error.code;
  return failure;
}

async function readEvents(response, onChunk) {
  // server-sent events: `data: {...}` blocks apart by a blank line, the last `data: [DONE]`
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!block.startsWith("data: ")) continue;
      const data = block.slice(6);
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      finish = onChunk(chunk) || finish;
    }
  }
}

// ------------------------------------------------------------------ the run, and the tabs

// /v1/run as last read: whether the run has a chat template decides which views exist
let runInfo = null;

async function fetchRun() {
  const response = await fetch("/v1/run", { headers: headers() });
  if (!response.ok) throw await responseError(response);
  return response.json();
}

function hasChat() {
  return Boolean(runInfo && runInfo.chat_template);
}

function show(view) {
  if (view === "chat" && !hasChat()) view = "play";
  if (!["chat", "play", "run"].includes(view)) view = hasChat() ? "chat" : "play";
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === view);
  }
  $("view-chat").hidden = view !== "chat";
  $("view-play").hidden = view !== "play";
  $("view-run").hidden = view !== "run";
  if (view === "run") refreshRun();
  if (view === "chat") $("chat-input").focus();
}
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => { location.hash = tab.dataset.view; });
}
window.addEventListener("hashchange", () => show(location.hash.slice(1)));

async function start() {
  // learn what is served before showing a view, so a chat run opens on its chat
  try {
    runInfo = await fetchRun();
    $("page-status").hidden = true;
  } catch (e) {
    runInfo = null;
    $("page-status").textContent = "could not read the run: " + e.message;
    $("page-status").hidden = false;
  }
  const name = runInfo ? runInfo.model : "";
  $("model-name").textContent = name;
  document.title = (name ? name + " · " : "") + (hasChat() ? "gptlab chat" : "gptlab");
  $("tab-chat").hidden = !hasChat();
  show(location.hash.slice(1));
}

// a new key may open what the old one could not
keyInput.addEventListener("change", () => {
  localStorage.setItem("gptlab-api-key", keyInput.value);
  start();
});

// ------------------------------------------------------------------ chat

// The conversation so far, re-sent whole each turn: the server keeps no state. A New chat
// replaces the array, so a reply still streaming into the old one cannot leak into it.
let history = [];
let chatController = null;

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : runInfo.model || "assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  turn.append(who, content);
  $("chat-log").append(turn);
  scrollChat(true);
  return turn;
}

function scrollChat(force) {
  // follow the reply as it grows, unless the reader has scrolled up to read
  const log = $("chat-log");
  if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 40) {
    log.scrollTop = log.scrollHeight;
  }
}

function chatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

function contextNote(usage) {
  // how close the conversation is to the context window, which ends it
  const context = runInfo.config.model.context_length;
  return usage ? "; " + usage.total_tokens + " of " + context + " context tokens used" : "";
}

async function sendChat() {
  const text = $("chat-input").value;
  if (!text.trim() || chatController) return;
  const turns = history;
  const system = $("system").value;
  const messages = system.trim() ? [{ role: "system", content: system }] : [];
  messages.push(...turns, { role: "user", content: text });
  turns.push({ role: "user", content: text });
  $("chat-input").value = "";
  const asked = addTurn("user", text);
  const turn = addTurn("assistant", "");
  turn.classList.add("streaming");
  const content = turn.querySelector(".content");
  const body = {
    messages: messages,
    temperature: Number($("chat-temperature").value),
    max_tokens: Number($("chat-max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const controller = (chatController = new AbortController());
  chatBusy(true);
  $("chat-status").textContent = "replying…";
  let reply = "", usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw await responseError(response);
    const finish = await readEvents(response, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices[0];
      if (!choice) return null;
      if (choice.delta.content) {
        reply += choice.delta.content;
        content.textContent = reply;
        scrollChat(false);
      }
      return choice.finish_reason;
    });
    turns.push({ role: "assistant", content: reply });
    if (turns === history) {
      const cut = finish === "length" ? ": cut at max tokens or the context's end" : "";
      $("chat-status").textContent = "done (" + (finish || "?") + ")" + cut + contextNote(usage);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      // what was shown stays in the conversation, so the next turn follows it
      turns.push({ role: "assistant", content: reply });
      turn.classList.add("stopped");
      if (turns === history) $("chat-status").textContent = "stopped";
    } else {
      // the turn did not happen: take it back (the next must follow an assistant's turn)
      // and give the text back to edit
      turns.pop();
      asked.remove();
      turn.remove();
      if (turns === history) {
        $("chat-input").value = text;
        $("chat-status").textContent =
          e.code === "context_length_exceeded"
            ? "error: the conversation no longer fits the model's context window of " +
              runInfo.config.model.context_length + " tokens; press New chat (" + e.message + ")"
            : "error: " + e.message;
      }
    }
  } finally {
    turn.classList.remove("streaming");
    if (chatController === controller) {
      chatController = null;
      chatBusy(false);
    }
  }
}

function newChat() {
  if (chatController) chatController.abort();
  chatController = null;
  chatBusy(false);
  history = [];
  $("chat-log").textContent = "";
  $("chat-status").textContent = "";
  $("chat-input").focus();
}

function showSystem() {
  // the summary shows the system message while it is folded away, so it is not forgotten
  const text = $("system").value.trim();
  $("system-summary").textContent = text
    ? ": " + (text.length > 60 ? text.slice(0, 60) + "…" : text)
    : " (optional; sent first in every turn)";
}

$("chat-form").addEventListener("submit", (e) => { e.preventDefault(); sendChat(); });
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendChat();
  }
});
$("chat-stop").addEventListener("click", () => chatController && chatController.abort());
$("chat-new").addEventListener("click", newChat);
$("system").addEventListener("input", showSystem);

// ------------------------------------------------------------------ playground

let controller = null;

function unescape(text) {
  // the stop field takes \n and \t as typed escapes, since an input holds one line
  return text.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
}

async function send() {
  const prompt = $("prompt").value || $("prompt").placeholder;
  const body = {
    prompt: prompt,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
  };
  const stop = unescape($("stop").value);
  if (stop) body.stop = stop;
  $("out-prompt").textContent = prompt;
  $("out-text").textContent = "";
  $("status").textContent = "generating…";
  $("send").disabled = true;
  $("stop-button").disabled = false;
  controller = new AbortController();
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw await responseError(response);
    const finish = await readEvents(response, (chunk) => {
      $("out-text").textContent += chunk.choices[0].text;
      return chunk.choices[0].finish_reason;
    });
    $("status").textContent = "done (" + (finish || "?") + ")";
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    $("send").disabled = false;
    $("stop-button").disabled = true;
    controller = null;
  }
}

$("send").addEventListener("click", send);
$("stop-button").addEventListener("click", () => controller && controller.abort());

// ------------------------------------------------------------------ run view

let runTimer = null;

async function refreshRun() {
  clearTimeout(runTimer);
  let run;
  try {
    run = await fetchRun();
  } catch (e) {
    $("run-status").textContent = "error: " + e.message;
    return;
  }
  const train = run.records.filter((r) => r.event === "train");
  const evals = run.records.filter((r) => r.event === "eval");
  const samples = run.records.filter((r) => r.event === "sample");
  const last = train.length ? train[train.length - 1] : null;
  $("run-status").textContent =
    (run.records.length ? "" : "no metrics.jsonl for this model. ") +
    (run.training ? "training" : "finished") +
    (last ? ", step " + last.step : "") + (run.checkpoint ? "; serving " + run.checkpoint : "");
  plot($("plot-loss"), [
    train.map((r) => [r.step, r.loss]),
    evals.map((r) => [r.step, r.val_loss]),
  ], ["train", "validation"]);
  plot($("plot-lr"), [train.map((r) => [r.step, r.lr])]);
  plot($("plot-speed"), [train.map((r) => [r.step, r.tokens_per_s])]);
  showTasks(run.records.filter((r) => r.event === "tasks"));
  const box = $("samples");
  box.textContent = "";
  for (const s of samples.slice(-3).reverse()) {
    const div = document.createElement("div");
    div.className = "sample";
    const label = document.createElement("b");
    label.textContent = "step " + s.step + ": ";
    div.append(label, s.text);
    box.append(div);
  }
  $("config").textContent = JSON.stringify(run.config, null, 2);
  // follow a run that still trains, while its view is open
  if (run.training && !$("view-run").hidden) runTimer = setTimeout(refreshRun, 5000);
}

function showTasks(tasks) {
  // the core curve, and the latest task evaluation as a table (train.eval_tasks)
  $("fig-tasks").hidden = !tasks.length;
  const table = $("tasks");
  table.textContent = "";
  if (!tasks.length) return;
  plot($("plot-tasks"), [tasks.map((r) => [r.step, r.core])]);
  const latest = tasks[tasks.length - 1];
  const row = (cells, tag) => {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement(tag);
      td.textContent = c;
      tr.append(td);
    }
    table.append(tr);
  };
  row(["tasks at step " + latest.step, "acc", "acc_norm", "centred", "items"], "th");
  for (const [name, t] of Object.entries(latest.tasks)) {
    const f = (v) => (typeof v === "number" ? v.toFixed(3) : "");
    row([name, f(t.acc), f(t.acc_norm), f(t.centred), String(t.n_items)], "td");
  }
  row(["core", "", "", latest.core.toFixed(3), ""], "td");
}

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count, least = 0) {
  // about `count` round values (1, 2 or 5 times a power of ten apart, at least `least`),
  // from the last at or below lo to the first at or above hi
  const raw = Math.max((hi - lo) / count, least);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw * 0.999);
  const ticks = [];
  for (let i = Math.floor(lo / step + 1e-9); i <= Math.ceil(hi / step - 1e-9); i++) {
    ticks.push(+(i * step).toPrecision(12)); // 0.3, not 0.30000000000000004
  }
  return { ticks, step };
}

function tickFormat(step, largest) {
  // one format for a whole axis, in one unit and with as many digits as the tick spacing
  // needs, so labels line up and compare at a glance: 10.55 10.60, 0.2e−3 0.4e−3, 10k 12k
  const digits = (s) => Math.max(0, -Math.floor(Math.log10(s) + 1e-9));
  let unit = 1, name = "";
  if (largest >= 1e7) [unit, name] = [1e6, "M"];
  else if (largest >= 1e4) [unit, name] = [1e3, "k"];
  else if (largest < 1e-2) {
    const power = Math.floor(Math.log10(largest) + 1e-9);
    [unit, name] = [10 ** power, "e" + String(power).replace("-", "−")];
  }
  return (v) => (v === 0 ? "0" : (v / unit).toFixed(digits(step / unit)) + name);
}

function plot(svg, series, names) {
  // lines of [x, y] points in the 400 x 220 box: y gridlines at round values, both axes
  // with ticks and labels, and a legend when the series are named
  svg.textContent = "";
  const lines = series.map((line) => line.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)));
  const pts = lines.flat();
  if (!pts.length) {
    svg.append(el("text", { x: 200, y: 110, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return;
  }
  const L = 50, R = 388, T = 12, B = 184;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) {
    const pad = Math.abs(y0) / 10 || 1;
    y0 -= pad; y1 += pad;
  }
  // the y range grows to the round values around the data, so the lines sit on the grid;
  // the x range stays the data's, so the lines span the chart
  const yt = niceTicks(y0, y1, 5);
  [y0, y1] = [yt.ticks[0], yt.ticks[yt.ticks.length - 1]];
  const xt = niceTicks(x0, x1, 6, 1); // steps are whole numbers
  const xTicks = xt.ticks.filter((x) => x >= x0 && x <= x1);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (R - L);
  const sy = (y) => B - ((y - y0) / (y1 - y0)) * (B - T);
  // whole pixels plus a half: a 1-pixel line then covers one row of pixels, not two faint ones
  const px = (v) => Math.round(v) + 0.5;

  const yLabel = tickFormat(yt.step, Math.max(Math.abs(y0), Math.abs(y1)));
  for (const y of yt.ticks) {
    const v = px(sy(y));
    if (y !== y0) svg.append(el("line", { class: "grid", x1: L, x2: R, y1: v, y2: v }));
    svg.append(el("line", { class: "tick", x1: L - 4, x2: L, y1: v, y2: v }));
    svg.append(el("text", { class: "tick-y", x: L - 7, y: v + 3.5, "text-anchor": "end" }, yLabel(y)));
  }
  const xLabel = tickFormat(xt.step, Math.max(Math.abs(x0), Math.abs(x1)));
  for (const x of xTicks) {
    const h = px(sx(x));
    svg.append(el("line", { class: "tick", x1: h, x2: h, y1: B, y2: B + 4 }));
    svg.append(el("text", { class: "tick-x", x: h, y: B + 15, "text-anchor": "middle" }, xLabel(x)));
  }
  svg.append(el("text", { class: "axis-title", x: (L + R) / 2, y: B + 30, "text-anchor": "middle" }, "step"));

  lines.forEach((line, i) => {
    if (!line.length) return;
    const d = line.map(([x, y], j) => (j ? "L" : "M") + sx(x).toFixed(1) + "," + sy(y).toFixed(1)).join("");
    svg.append(el("path", { class: "line line" + i, d: d, fill: "none" }));
    if (line.length <= 40) { // few points (evaluations): mark each, with its value on hover
      for (const [x, y] of line) {
        const dot = el("circle", { class: "dot" + i, cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.5 });
        dot.append(el("title", {}, "step " + x + ": " + (+y.toPrecision(4))));
        svg.append(dot);
      }
    }
  });
  // the axes last, over the grid and the lines; `fill: none`, or a path's area is filled
  svg.append(el("line", { class: "axis x-axis", x1: L, x2: R + 0.5, y1: px(B), y2: px(B), fill: "none" }));
  svg.append(el("line", { class: "axis y-axis", x1: px(L), x2: px(L), y1: T, y2: B + 0.5, fill: "none" }));
  if (names) legend(svg, lines, names, R);
}

function legend(svg, lines, names, right) {
  // top right, each series' name and its latest value beside a sample of its line
  const group = el("g", { class: "legend" });
  const rows = names.map((name, i) => {
    const line = lines[i];
    const latest = line.length ? " " + line[line.length - 1][1].toPrecision(4) : "";
    return name + latest;
  });
  const width = 34 + 6.2 * Math.max(...rows.map((r) => r.length));
  const x = right - width - 4, y = 16;
  group.append(el("rect", { class: "legend-box", x: x, y: y, width: width, height: 8 + 14 * rows.length, rx: 3 }));
  rows.forEach((text, i) => {
    const cy = y + 11 + 14 * i;
    group.append(el("line", { class: "line line" + i, x1: x + 6, x2: x + 24, y1: cy, y2: cy }));
    group.append(el("text", { x: x + 29, y: cy + 3.5 }, text));
  });
  svg.append(group);
}

// ------------------------------------------------------------------ start

showSystem();
start();
