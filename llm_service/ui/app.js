// The daemon's page: models and their states from /api/status, kept live by /api/events, and a
// chat over /api/chat. No build step, no libraries: the box may be offline.
"use strict";

const LOADING = new Set(["waiting_for_tokenizer", "starting", "initializing"]);
const SPEEDS_KEPT = 20;
const KEY_ITEM = "axm1-llm-api-key";

const ui = {
  key: sessionStorage.getItem(KEY_ITEM),
  keyPrompt: null,          // the pending "ask for the key" promise, shared by every caller
  cards: new Map(),         // model name -> its card element
  speeds: new Map(),        // model name -> tokens/s of recent answers
  lastEventId: null,
  refreshTimer: null,
  chat: { messages: [], abort: null },
};

const $ = (id) => document.getElementById(id);

// ---- the API, with the key asked for once -------------------------------------------------------

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (ui.key) headers.set("Authorization", `Bearer ${ui.key}`);
  let body = options.body;
  if (options.json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { method: options.method || "GET", headers, body, signal: options.signal });
  if (response.status === 401) {
    await askForKey(ui.key ? "That key was not accepted." : "");
    return api(path, options);
  }
  return response;
}

function askForKey(message) {
  if (!ui.keyPrompt) {
    ui.keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-error").textContent = message;
      $("key-input").value = "";
      dialog.showModal();
      $("key-form").addEventListener("submit", () => {
        ui.key = $("key-input").value.trim();
        sessionStorage.setItem(KEY_ITEM, ui.key);
        ui.keyPrompt = null;
        resolve();
      }, { once: true });
    });
  }
  return ui.keyPrompt;
}

async function errorText(response) {
  try {
    const data = await response.json();
    return (data.error && (data.error.message || data.error)) || data.detail || JSON.stringify(data);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// ---- models ---------------------------------------------------------------------------------

function scheduleRefresh(delay = 150) {
  if (ui.refreshTimer) return;
  ui.refreshTimer = setTimeout(() => { ui.refreshTimer = null; refresh(); }, delay);
}

async function refresh() {
  try {
    const response = await api("/api/status");
    if (!response.ok) throw new Error(await errorText(response));
    const status = await response.json();
    const problems = [status.descriptor && status.descriptor.error, ...(status.metrics ? status.metrics.problems || [] : [])];
    $("daemon-problems").textContent = problems.filter(Boolean).join("; ");
    renderModels(status.models || []);
  } catch (error) {
    $("daemon-problems").textContent = `status: ${error.message}`;
  }
}

function renderModels(models) {
  const seen = new Set();
  for (const model of models) {
    seen.add(model.name);
    let card = ui.cards.get(model.name);
    if (!card) {
      card = newCard(model.name);
      ui.cards.set(model.name, card);
      $("models").append(card);
    }
    updateCard(card, model);
  }
  for (const [name, card] of ui.cards) {
    if (!seen.has(name)) { card.remove(); ui.cards.delete(name); }
  }
  updateModelPicker(models);
}

function newCard(name) {
  const card = $("model-card").content.firstElementChild.cloneNode(true);
  card.dataset.model = name;
  card.querySelector(".name").textContent = name;
  const bar = card.querySelector("progress");
  bar.id = `progress-${name}`;
  const label = card.querySelector(".progress-label");
  label.htmlFor = bar.id;
  card.querySelector(".load").setAttribute("aria-label", `Load ${name}`);
  card.querySelector(".unload").setAttribute("aria-label", `Unload ${name}`);
  card.querySelector(".chart").setAttribute("aria-label", `tokens per second of ${name}'s recent answers`);
  card.querySelector(".load").addEventListener("click", () => modelAction(name, "load"));
  card.querySelector(".unload").addEventListener("click", () => modelAction(name, "unload"));
  card.querySelector(".logs").addEventListener("toggle", (event) => { if (event.target.open) showLogs(name); });
  return card;
}

function updateCard(card, model) {
  const state = model.state || "unknown";
  const badge = card.querySelector(".state");
  badge.textContent = state;
  badge.className = `state state-${state}`;
  card.dataset.state = state;

  const loading = LOADING.has(state);
  const progress = card.querySelector(".progress");
  progress.hidden = !loading;
  if (loading) showProgress(card, model.progress);

  const queue = model.queue || {};
  card.querySelector(".queue").textContent =
    `${queue.length ?? 0} waiting, ${queue.running ?? 0} running` +
    (queue.waiting && queue.waiting.length ? ` (oldest ${queue.waiting[0].age_s.toFixed(1)} s)` : "");
  const flight = model.in_flight;
  card.querySelector(".in-flight").textContent = flight && typeof flight === "object"
    ? `${flight.id} · ${flight.age_s.toFixed(1)} s · ${flight.phase || ""}`
    : (flight ? `${flight} request(s)` : "none");
  const context = model.context;
  card.querySelector(".context").textContent = context && context.size
    ? `${context.used ?? "–"} of ${context.size} tokens`
    : "–";
  card.querySelector(".restarts").textContent = `${model.restarts ?? 0}`;
  const error = model.last_error;
  card.querySelector(".last-error").textContent = error
    ? `last error: ${error.reason || ""}${error.message ? " — " + error.message : ""}` : "";
  card.querySelector(".load").disabled = state !== "stopped" && state !== "failed";
  card.querySelector(".unload").disabled = state === "stopped" || state === "disabled";
  drawSpeeds(card, model.name);
  if (card.querySelector(".logs").open) showLogs(model.name);
}

function showProgress(card, progress) {
  const bar = card.querySelector("progress");
  const label = card.querySelector(".progress-label");
  if (progress && typeof progress.percent === "number") {
    bar.value = progress.percent;
    const step = progress.total ? ` ${progress.step}/${progress.total}` : "";
    label.textContent = `Loading ${progress.percent}%${step} ${progress.message || ""}`;
  } else {
    bar.removeAttribute("value");  // indeterminate until the backend says more
    label.textContent = "Loading…";
  }
}

function drawSpeeds(card, name) {
  const speeds = ui.speeds.get(name) || [];
  const svg = card.querySelector(".chart");
  const text = card.querySelector(".speed-text");
  svg.hidden = !speeds.length;
  if (!speeds.length) { svg.innerHTML = ""; text.textContent = "no answers yet"; return; }
  const top = Math.max(...speeds, 1);
  const step = speeds.length > 1 ? 100 / (speeds.length - 1) : 0;
  const xy = speeds.map((s, i) => [(i * step).toFixed(1), (23 - (s / top) * 22).toFixed(1)]);
  svg.innerHTML = speeds.length === 1
    ? `<circle cx="${xy[0][0]}" cy="${xy[0][1]}" r="1.5" fill="currentColor"/>`
    : `<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="${xy.map((p) => p.join(",")).join(" ")}"/>`;
  text.textContent = ` last ${speeds[speeds.length - 1].toFixed(1)}`;
}

async function modelAction(name, action) {
  const card = ui.cards.get(name);
  card.querySelector(".last-error").textContent = "";
  const response = await api(`/api/models/${encodeURIComponent(name)}/${action}`, { method: "POST", json: {} });
  if (!response.ok) card.querySelector(".last-error").textContent = `${action}: ${await errorText(response)}`;
  scheduleRefresh(0);
}

async function showLogs(name) {
  const card = ui.cards.get(name);
  const response = await api(`/api/logs/${encodeURIComponent(name)}`);
  if (!response.ok) return;
  const data = await response.json();
  card.querySelector(".logs pre").textContent = data.lines.slice(-15).map((l) => l.line ?? l.text ?? JSON.stringify(l)).join("\n");
}

function updateModelPicker(models) {
  const picker = $("chat-model");
  const names = models.filter((m) => m.state !== "disabled").map((m) => m.name);
  const current = picker.value;
  if ([...picker.options].map((o) => o.value).join("\n") === names.join("\n")) return;
  picker.replaceChildren(...names.map((n) => new Option(n, n)));
  if (names.includes(current)) picker.value = current;
}

// ---- live events (Server-Sent Events read with fetch, so that the key can go in a header) ----

async function followEvents() {
  for (;;) {
    try {
      const headers = ui.lastEventId ? { "Last-Event-ID": String(ui.lastEventId) } : {};
      const response = await api("/api/events", { headers });
      if (!response.ok) throw new Error(await errorText(response));
      setConnection("live");
      await readEvents(response.body.getReader());
    } catch (error) {
      setConnection(`reconnecting (${error.message})`);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
    scheduleRefresh(0);
  }
}

async function readEvents(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message", data = "", id = null;
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) type = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
        else if (line.startsWith("id: ")) id = Number(line.slice(4));
      }
      if (id !== null) ui.lastEventId = id;
      if (data) onEvent(type, JSON.parse(data));
    }
  }
}

function onEvent(type, event) {
  if (type === "progress") {
    const card = ui.cards.get(event.model);
    if (card) { card.querySelector(".progress").hidden = false; showProgress(card, event); }
  } else if (type === "request" && event.phase === "finished" && event.tokens_per_second) {
    const speeds = ui.speeds.get(event.model) || [];
    speeds.push(event.tokens_per_second);
    ui.speeds.set(event.model, speeds.slice(-SPEEDS_KEPT));
  }
  if (type !== "progress") scheduleRefresh();
}

function setConnection(text) {
  $("connection").textContent = text;
}

// ---- chat -----------------------------------------------------------------------------------

function addMessage(role, text) {
  const item = document.createElement("div");
  item.className = `message message-${role}`;
  const who = document.createElement("strong");
  who.textContent = role === "user" ? "You" : role;
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  thinking.innerHTML = "<summary>Thinking</summary><div class='thinking-text'></div>";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(who, thinking, content);
  $("chat-log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || ui.chat.abort) return;
  input.value = "";
  ui.chat.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const messages = [...ui.chat.messages];
  const system = $("chat-system").value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const abort = new AbortController();
  ui.chat.abort = abort;
  $("chat-stop").disabled = false;
  $("chat-send").disabled = true;
  $("chat-status").textContent = "waiting for the model…";
  let content = "", thinking = "";
  try {
    const response = await api("/api/chat", {
      method: "POST", signal: abort.signal,
      json: { model: $("chat-model").value, messages, stream: true },
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (!line.trim()) continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error);
        const message = chunk.message || {};
        if (message.thinking) {
          thinking += message.thinking;
          const box = answer.querySelector(".thinking");
          box.hidden = false;
          box.querySelector(".thinking-text").textContent = thinking;
        }
        if (message.content) {
          content += message.content;
          answer.querySelector(".content").textContent = content;
          $("chat-status").textContent = "answering…";
        }
        if (chunk.done) {
          const seconds = (chunk.eval_duration || 0) / 1e9;
          $("chat-status").textContent = seconds
            ? `${chunk.eval_count} tokens, ${(chunk.eval_count / seconds).toFixed(1)} tokens/s` : "done";
        }
      }
    }
    ui.chat.messages.push({ role: "assistant", content });
  } catch (error) {
    if (error.name === "AbortError") {
      $("chat-status").textContent = "stopped";
      answer.classList.add("stopped");
      if (content) ui.chat.messages.push({ role: "assistant", content });
    } else {
      $("chat-status").textContent = "";
      const problem = document.createElement("p");
      problem.className = "error";
      problem.setAttribute("role", "alert");
      problem.textContent = error.message;
      answer.append(problem);
    }
  } finally {
    ui.chat.abort = null;
    $("chat-stop").disabled = true;
    $("chat-send").disabled = false;
    input.focus();
  }
}

function stopChat() {
  if (ui.chat.abort) ui.chat.abort.abort();
}

function clearChat() {
  stopChat();
  ui.chat.messages = [];
  $("chat-log").replaceChildren();
  $("chat-status").textContent = "";
}

// ---- start ----------------------------------------------------------------------------------

$("chat-form").addEventListener("submit", sendChat);
$("chat-stop").addEventListener("click", stopChat);
$("chat-clear").addEventListener("click", clearChat);
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});
refresh().then(followEvents);
setInterval(() => scheduleRefresh(0), 5000);  // ages and anything an event did not announce
