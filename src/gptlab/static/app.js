// The page of `gptlab serve`: a playground that streams from /v1/completions, and a run
// view drawn from /v1/run (the run's metrics.jsonl). No libraries, no network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("gptlab-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("gptlab-api-key", keyInput.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// ------------------------------------------------------------------ tabs

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === view);
  }
  $("view-play").hidden = view !== "play";
  $("view-run").hidden = view !== "run";
  if (view === "run") refreshRun();
}
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => { location.hash = tab.dataset.view; });
}
window.addEventListener("hashchange", () => show(location.hash.slice(1) || "play"));

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
    if (!response.ok) throw new Error(await errorText(response));
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

$("send").addEventListener("click", send);
$("stop-button").addEventListener("click", () => controller && controller.abort());

// ------------------------------------------------------------------ run view

let runTimer = null;

async function refreshRun() {
  clearTimeout(runTimer);
  let run;
  try {
    const response = await fetch("/v1/run", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    run = await response.json();
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
  ]);
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

function fmt(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-2 || a >= 1e5) ? v.toExponential(1) : String(+v.toPrecision(3));
}

function plot(svg, series) {
  // lines of [x, y] points in a 400 x 220 box, with the axes' ranges written at the ends
  svg.textContent = "";
  const pts = series.flat().filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (!pts.length) {
    svg.append(el("text", { x: 150, y: 110 }, "no data yet"));
    return;
  }
  const L = 45, R = 390, T = 10, B = 195;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (R - L);
  const sy = (y) => B - ((y - y0) / (y1 - y0)) * (B - T);
  svg.append(el("path", { class: "axis", d: `M${L},${T}V${B}H${R}` }));
  svg.append(el("text", { x: 2, y: T + 8 }, fmt(y1)), el("text", { x: 2, y: B }, fmt(y0)));
  svg.append(el("text", { x: L, y: 212 }, "step " + fmt(x0)), el("text", { x: R - 50, y: 212 }, fmt(x1)));
  series.forEach((line, i) => {
    const good = line.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!good.length) return;
    const d = good.map(([x, y], j) => (j ? "L" : "M") + sx(x).toFixed(1) + "," + sy(y).toFixed(1)).join("");
    svg.append(el("path", { class: "line" + i, d: good.length > 1 ? d : d + "h2" }));
  });
}

// ------------------------------------------------------------------ start

fetch("/v1/models", { headers: headers() })
  .then((r) => (r.ok ? r.json() : null))
  .then((m) => { if (m) $("model-name").textContent = m.data[0].id; })
  .catch(() => {});
show(location.hash.slice(1) || "play");
