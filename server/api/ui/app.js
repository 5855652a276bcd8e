// loraplex playground: talks to the server's public API only (chat completions, /v1/route,
// /v1/models, /v1/adapters, /metrics). Keys live in the two password fields and go out only as
// bearer headers: never in a URL, cookie or storage. Everything the API says is shown as text.
"use strict";

const $ = (selector) => document.querySelector(selector);
const POLL_MS = 2000;
const HISTORY = 90; // points kept per live chart (3 minutes at POLL_MS)

// ---- keys, requests, errors -------------------------------------------------------------

function authHeaders(admin) {
  const api = $("#api-key").value.trim();
  const adminKey = $("#admin-key").value.trim();
  const key = admin ? adminKey || api : api || adminKey;
  return key ? { Authorization: "Bearer " + key } : {};
}

class ApiError extends Error {}

async function apiError(response) {
  // the API's own words: OpenAI's {"error": {"message": ...}} shape
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return new ApiError(message);
}

async function api(path, { method = "GET", body, admin = false, json = true } = {}) {
  const headers = authHeaders(admin);
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload });
  if (!response.ok) throw await apiError(response);
  return json ? response.json() : response.text();
}

function showStatus(message, kind = "error") {
  const status = $("#status");
  status.textContent = message;
  status.className = "status " + kind;
  status.hidden = !message;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- tabs (WAI-ARIA tabs: click, arrow keys, Home/End) ----------------------------------

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab) => {
    for (const other of tabs) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
    }
    tab.focus();
    if (tab.id === "tab-experts") refreshExperts();
  };
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 };
      if (event.key in moves) {
        event.preventDefault();
        select(tabs[(moves[event.key] + tabs.length) % tabs.length]);
      }
    });
  });
}

// ---- models -----------------------------------------------------------------------------

async function loadModels() {
  let models;
  try {
    models = (await api("/v1/models")).data;
  } catch (error) {
    showStatus("Models: " + error.message);
    return;
  }
  for (const select of [$("#model"), $("#model-b")]) {
    const previous = select.value;
    select.replaceChildren();
    for (const model of models) {
      const kind = model.owned_by === "loraplex-router" ? "router" : model.parent ? "expert" : "base";
      select.append(element("option", { value: model.id }, `${model.id} (${kind})`));
    }
    if (models.some((m) => m.id === previous)) select.value = previous;
  }
  if ($("#status").textContent.startsWith("Models: ")) showStatus(""); // that problem is solved; others stay
}

// ---- chat -------------------------------------------------------------------------------

const conversations = { a: [], b: [] };
let inflight = [];

function chatParams() {
  const params = {};
  const temperature = $("#temperature").value;
  if (temperature !== "") params.temperature = Number(temperature);
  const maxTokens = $("#max-tokens").value;
  if (maxTokens !== "") params.max_tokens = Number(maxTokens);
  const stop = $("#stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) params.stop = stop;
  return params;
}

function newTurn(column, model, prompt) {
  const text = element("p", { class: "answer-text" });
  const meta = element("p", { class: "meta" }, "waiting for the first token…");
  const ranking = element("details", { class: "ranking", hidden: "" }, element("summary", {}, "Router ranking"));
  const turn = element("article", { class: "turn" },
    element("p", { class: "user" }, element("strong", {}, "You: "), prompt),
    element("div", { class: "assistant" }, element("strong", { class: "who" }, model + ": "), text, meta, ranking));
  column.append(turn);
  turn.scrollIntoView({ block: "end" });
  return { text, meta, ranking };
}

function metaLine(meta, parts) {
  meta.replaceChildren();
  parts.forEach(([label, value, cls], index) => {
    if (index) meta.append(" · ");
    meta.append(label + ": ", element("span", { class: cls }, value));
  });
}

async function readStream(response, onDelta) {
  // Server-sent events: "data: {json}" frames separated by a blank line, ending with "data: [DONE]"
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const frames = buffer.split(/\r?\n\r?\n/);
    buffer = frames.pop();
    for (const frame of frames) {
      for (const line of frame.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { finish, usage };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message || "the stream ended with an error");
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return { finish, usage };
}

async function showRanking(details, model, messages) {
  try {
    const route = await api("/v1/route", { method: "POST", body: { model, messages, top_k: 5 } });
    const list = element("ol");
    for (const entry of route.ranking) {
      const probability = entry.probability == null ? "" : `, p ${entry.probability.toFixed(2)}`;
      const excluded = entry.excluded ? " (ruled out by a negative example)" : "";
      list.append(element("li", {}, `${entry.expert}: score ${entry.score.toFixed(3)}${probability}${excluded}`));
    }
    const d = route.decision;
    const margin = d.margin == null ? "" : `, margin ${d.margin.toFixed(3)} (needs ${d.required_margin.toFixed(3)})`;
    const background = d.background == null ? "" : `, background ${d.background.toFixed(3)}`;
    details.append(element("p", { class: "decision" }, `decision: ${d.expert} via ${d.source}${background}${margin}`
      + (d.reason ? ` — ${d.reason}` : "")), list);
    details.hidden = false;
  } catch (error) {
    details.append(element("p", { class: "error" }, "Route: " + error.message));
    details.hidden = false;
  }
}

async function ask(side, model, prompt, controller) {
  const column = side === "a" ? $("#column-a") : $("#column-b");
  const history = conversations[side];
  const messages = [...history, { role: "user", content: prompt }];
  const { text, meta, ranking } = newTurn(column, model, prompt);
  const started = performance.now();
  let first = null;
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...authHeaders(false), "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...chatParams() }),
      signal: controller.signal,
    });
    if (!response.ok) throw await apiError(response);
    const expert = response.headers.get("X-Expert") || model;
    const source = response.headers.get("X-Router-Source") || "–";
    const score = response.headers.get("X-Router-Score");
    const { finish, usage } = await readStream(response, (delta) => {
      if (first === null) first = performance.now();
      answer += delta;
      text.textContent = answer;
    });
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : null;
    const rate = first !== null && tokens > 1 && ended > first ? ((tokens - 1) * 1000) / (ended - first) : null;
    metaLine(meta, [
      ["expert", expert, "expert"],
      ["source", source, "source"],
      ["score", score === null ? "–" : Number(score).toFixed(3), "score"],
      ["time to first token", first === null ? "–" : `${Math.round(first - started)} ms`, "ttft"],
      ["speed", rate === null ? "–" : `${rate.toFixed(1)} tokens/s`, "rate"],
      ["tokens", tokens === null ? "–" : String(tokens), "tokens"],
      ["finish", finish || "–", "finish"],
    ]);
    history.push({ role: "user", content: prompt }, { role: "assistant", content: answer });
    await showRanking(ranking, model, messages);
  } catch (error) {
    const message = error.name === "AbortError" ? "stopped" : error.message;
    meta.replaceChildren(element("span", { class: "error", role: "alert" }, message));
    if (answer) history.push({ role: "user", content: prompt }, { role: "assistant", content: answer });
  }
}

function setupChat() {
  const form = $("#chat-form");
  $("#compare").addEventListener("change", (event) => {
    $("#model-b-label").hidden = !event.target.checked;
    $("#column-b").hidden = !event.target.checked;
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = $("#prompt").value.trim();
    if (!prompt || inflight.length) return;
    $("#prompt").value = "";
    const sides = $("#compare").checked ? [["a", $("#model").value], ["b", $("#model-b").value]] : [["a", $("#model").value]];
    inflight = sides.map(() => new AbortController());
    $("#send").disabled = true;
    $("#stop-button").disabled = false;
    await Promise.all(sides.map(([side, model], i) => ask(side, model, prompt, inflight[i])));
    inflight = [];
    $("#send").disabled = false;
    $("#stop-button").disabled = true;
    $("#prompt").focus();
  });
  $("#stop-button").addEventListener("click", () => inflight.forEach((c) => c.abort()));
  $("#new-chat").addEventListener("click", () => {
    conversations.a = [];
    conversations.b = [];
    $("#column-a").replaceChildren();
    $("#column-b").replaceChildren();
  });
}

// ---- experts ----------------------------------------------------------------------------

function formatBytes(bytes) {
  if (bytes == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

async function refreshExperts() {
  const body = $("#experts-table tbody");
  let experts;
  try {
    experts = (await api("/v1/adapters", { admin: true })).data;
  } catch (error) {
    $("#experts-note").textContent = "Experts: " + error.message;
    body.replaceChildren();
    return;
  }
  $("#experts-note").textContent = `${experts.length} expert${experts.length === 1 ? "" : "s"} registered.`;
  body.replaceChildren(...experts.map((expert) => {
    const retire = element("button", { type: "button", class: "retire", "aria-label": `Retire ${expert.id}` }, "Retire");
    if (expert.source === "config") {
      retire.disabled = true;
      retire.title = "from the config file: remove it there";
    }
    retire.addEventListener("click", async () => {
      try {
        await api(`/v1/adapters/${encodeURIComponent(expert.id)}`, { method: "DELETE", admin: true });
        showStatus(`Retired ${expert.id}.`, "info");
      } catch (error) {
        showStatus("Retire: " + error.message);
      }
      await refreshExperts();
      await loadModels();
    });
    return element("tr", { "data-expert": expert.id },
      element("td", {}, expert.id), element("td", {}, expert.tier), element("td", {}, String(expert.rank)),
      element("td", {}, formatBytes(expert.size_bytes)), element("td", {}, String(expert.requests)),
      element("td", {}, expert.description || ""), element("td", {}, retire));
  }));
}

function lines(text) {
  return text.split(/\r?\n/).map((s) => s.trim()).filter(Boolean);
}

function setupExperts() {
  $("#refresh-experts").addEventListener("click", refreshExperts);
  $("#register-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData();
    const name = $("#reg-name").value.trim();
    form.append("name", name);
    if ($("#reg-description").value.trim()) form.append("description", $("#reg-description").value.trim());
    for (const example of lines($("#reg-examples").value)) form.append("examples", example);
    for (const stop of lines($("#reg-stop").value)) form.append("stop", stop);
    form.append("adapter_config", $("#reg-config").files[0]);
    form.append("adapter_model", $("#reg-weights").files[0]);
    const button = $("#register");
    button.disabled = true;
    try {
      await api("/v1/adapters", { method: "POST", body: form, admin: true });
      showStatus(`Registered ${name}.`, "info");
      event.target.reset();
    } catch (error) {
      showStatus("Register: " + error.message);
    } finally {
      button.disabled = false;
    }
    await refreshExperts();
    await loadModels();
  });
}

// ---- live view --------------------------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const label of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[label[1]] = label[2];
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

const total = (samples, name, where = () => true) =>
  samples.filter((s) => s.name === name && where(s.labels)).reduce((sum, s) => sum + s.value, 0);

function buckets(samples, name) {
  // cumulative counts by upper bound, summed over every expert's series
  const byBound = new Map();
  for (const s of samples) {
    if (s.name !== name + "_bucket") continue;
    const bound = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    byBound.set(bound, (byBound.get(bound) || 0) + s.value);
  }
  return [...byBound.entries()].sort((x, y) => x[0] - y[0]);
}

function quantile(q, cumulative) {
  // Prometheus' histogram_quantile: linear inside the bucket the rank falls in
  if (!cumulative.length) return null;
  const count = cumulative[cumulative.length - 1][1];
  if (!count) return null;
  const rank = q * count;
  let previousBound = 0;
  let previousCount = 0;
  for (const [bound, cum] of cumulative) {
    if (cum >= rank) {
      if (bound === Infinity) return previousBound;
      const share = cum === previousCount ? 0 : (rank - previousCount) / (cum - previousCount);
      return previousBound + (bound - previousBound) * share;
    }
    previousBound = bound;
    previousCount = cum;
  }
  return previousBound;
}

const series = { throughput: [], ttft: [], running: [], kv: [] };
let previous = null;

function draw(id, points) {
  const svg = document.getElementById(id);
  const values = points.filter((v) => v !== null);
  const top = Math.max(1e-9, ...values);
  const step = 200 / Math.max(1, HISTORY - 1);
  const offset = HISTORY - points.length;
  const coordinates = points.map((v, i) => v === null ? null : `${((offset + i) * step).toFixed(1)},${(38 - (v / top) * 36).toFixed(1)}`)
    .filter(Boolean).join(" ");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", coordinates);
  svg.replaceChildren(line);
}

function push(name, value) {
  series[name].push(value);
  if (series[name].length > HISTORY) series[name].shift();
  draw("chart-" + name, series[name]);
}

const ms = (seconds) => seconds === null ? "–" : `${Math.round(seconds * 1000)} ms`;

async function pollMetrics() {
  let samples;
  try {
    samples = parseMetrics(await api("/metrics", { admin: true, json: false }));
  } catch (error) {
    $("#live-updated").textContent = " — " + error.message;
    return;
  }
  const now = performance.now();
  const tokens = total(samples, "loraplex_generation_tokens_total");
  const ttft = buckets(samples, "loraplex_time_to_first_token_seconds");
  const rate = previous ? Math.max(0, tokens - previous.tokens) / ((now - previous.time) / 1000) : 0;
  let recent = null; // p50 of the first tokens since the last poll
  if (previous) {
    const before = new Map(previous.ttft);
    const delta = ttft.map(([bound, cum]) => [bound, cum - (before.get(bound) || 0)]);
    recent = quantile(0.5, delta);
  }
  previous = { time: now, tokens, ttft };
  const running = total(samples, "loraplex_requests_running");
  const waiting = total(samples, "loraplex_requests_waiting");
  const kv = total(samples, "loraplex_kv_cache_usage_ratio");
  const kvBytes = total(samples, "loraplex_kv_cache_used_bytes");
  const tier = (name) => total(samples, "loraplex_adapters_resident", (l) => l.tier === name);
  $("#stat-throughput").textContent = `${rate.toFixed(1)} tokens/s`;
  $("#stat-ttft").textContent = `${ms(quantile(0.5, ttft))} / ${ms(quantile(0.99, ttft))}`;
  $("#stat-running").textContent = `${running} / ${waiting}`;
  $("#stat-kv").textContent = `${(kv * 100).toFixed(1)}% (${formatBytes(kvBytes)})`;
  $("#stat-requests").textContent = String(total(samples, "loraplex_requests_total"));
  const slots = (state) => total(samples, "loraplex_adapter_memory_bytes", (l) => l.state === state);
  $("#stat-adapters").textContent = `${tier("device")} / ${tier("cpu")} / ${tier("disk")}`;
  $("#stat-adapter-memory").textContent = `${formatBytes(slots("used"))} of ${formatBytes(slots("total"))}`;
  $("#stat-memory").textContent = formatBytes(total(samples, "loraplex_process_resident_memory_bytes"));
  push("throughput", rate);
  push("ttft", recent);
  push("running", running);
  push("kv", kv);
  const perExpert = new Map();
  for (const s of samples) {
    if (s.name !== "loraplex_requests_total") continue;
    // "none": refused before a model was chosen (bad request, unknown model, no key)
    const name = s.labels.adapter === "none" ? "(refused before routing)" : s.labels.adapter;
    perExpert.set(name, (perExpert.get(name) || 0) + s.value);
  }
  const most = Math.max(1, ...perExpert.values());
  $("#traffic").replaceChildren(...[...perExpert.entries()].sort((x, y) => y[1] - x[1]).map(([name, count]) =>
    element("li", { "data-expert": name },
      element("span", { class: "bar-label" }, `${name}: ${count}`),
      element("meter", { min: "0", max: String(most), value: String(count), "aria-label": `${name} requests` }))));
  $("#live-updated").textContent = `, last at ${new Date().toLocaleTimeString()}`;
}

// ---- start ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setupTabs();
  setupChat();
  setupExperts();
  for (const input of [$("#api-key"), $("#admin-key")]) {
    input.addEventListener("change", () => { loadModels(); pollMetrics(); });
  }
  $("#keys").addEventListener("submit", (event) => event.preventDefault());
  loadModels();
  pollMetrics();
  setInterval(pollMetrics, POLL_MS);
});
