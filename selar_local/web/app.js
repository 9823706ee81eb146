// selar-local chat page. Talks only to this server's /v1 API, like any OpenAI client,
// asking for "selar_trace": true so that each streamed chunk describes its token.
"use strict";

const DEFAULTS = JSON.parse(document.getElementById("selar-defaults").textContent);
const KEY_STORAGE = "selar.apiKey";
const THEME_STORAGE = "selar.theme";
const KNOBS = ["tau", "lam", "ks", "temperature", "max_tokens", "seed"];
const SELAR_ONLY = ["tau", "lam"];  // the other methods ignore these two
const METHOD_HINTS = {
  cot: "Plain sampling: every step feeds the sampled token (the baseline).",
  selar: "SeLaR: when the entropy of the top k_s candidates exceeds tau, the next input is their " +
         "mixture, pushed away from the top token by lambda.",
  soft: "Soft Thinking: every step inside <think> feeds a mixture of the top candidates.",
  moi: "Mixture of Inputs: every step feeds the sampled token blended with its top-N posterior.",
  latent: "Latent thoughts: before the text, m steps feed the model's own hidden state back as the " +
          "next input (no token shown: a marker each, its top tokens on hover); then as cot.",
};
const THINK_OPEN = "<think>";
const THINK_CLOSE = "</think>";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};

const state = {
  history: [],        // {role, content} sent with each request
  busy: false,
  controller: null,   // AbortController of the request in flight
  apiKey: sessionStorage.getItem(KEY_STORAGE),
  pinned: null,       // the token span whose detail stays open (tap / click)
  softAvailable: true,
};

// ---------------------------------------------------------------- API and API key

async function api(path, options = {}) {
  for (;;) {
    const headers = Object.assign({}, options.headers || {});
    if (state.apiKey) headers.Authorization = "Bearer " + state.apiKey;
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (response.status !== 401) return response;
    const hadKey = Boolean(state.apiKey);
    const key = await askKey(hadKey ? "That API key was refused; enter the server's key." : null);
    if (!key) throw new Error("this server requires an API key");
  }
}

function askKey(message) {
  const dialog = $("key-dialog");
  $("key-message").textContent = message ||
    "This server requires an API key. It is kept in this tab's session storage only.";
  $("key-input").value = "";
  return new Promise((resolve) => {
    const done = (key) => {
      $("key-form").removeEventListener("submit", onSubmit);
      $("key-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      resolve(key);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      state.apiKey = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      done(key);
    };
    const onCancel = (event) => { event.preventDefault(); done(null); };
    $("key-form").addEventListener("submit", onSubmit);
    $("key-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    $("key-input").focus();
  });
}

async function loadModel() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) return;
    const model = (await response.json()).data[0];
    $("model-name").textContent = model.id;
    const meta = model.meta || {};
    if (meta.n_ctx) {
      $("max_tokens").max = meta.n_ctx;
      $("max_tokens-range").max = meta.n_ctx;
    }
    if (meta.soft_decoding === false) {  // the load-time self-check failed: only cot runs
      state.softAvailable = false;
      for (const option of $("method").options) option.disabled = option.value !== "cot";
      setKnob("method", "cot");
      $("method-hint").textContent = "Soft decoding is unavailable for this model (self-check failed): only cot.";
    }
  } catch (error) {
    setState(error.message);
  }
}

// ---------------------------------------------------------------- side panel

function setKnob(name, value) {
  if (name === "method") {
    $("method").value = value;
    updateMethod();
    return;
  }
  $(name).value = value;
  const range = $(name + "-range");
  if (range) range.value = value;
}

function updateMethod() {
  const method = $("method").value;
  if (state.softAvailable) $("method-hint").textContent = METHOD_HINTS[method] || "";
  for (const name of SELAR_ONLY) {
    document.querySelector(`.knob[data-knob="${name}"]`).classList.toggle("inactive", method !== "selar");
  }
}

function initPanel() {
  const select = $("method");
  for (const method of DEFAULTS.methods) select.append(new Option(method, method));
  $("ks").max = $("ks-range").max = DEFAULTS.top_k;  // ks <= top_k
  for (const name of KNOBS) {
    const number = $(name);
    const range = $(name + "-range");
    if (range) {
      range.addEventListener("input", () => { number.value = range.value; });
      number.addEventListener("input", () => { range.value = number.value; });
    }
  }
  $("tau-auto").addEventListener("change", updateTauAuto);
  select.addEventListener("change", updateMethod);
  $("seed-random").addEventListener("click", () => setKnob("seed", Math.floor(Math.random() * 2 ** 31)));
  $("reset").addEventListener("click", resetPanel);
  resetPanel();
}

function resetPanel() {
  for (const [name, value] of Object.entries(DEFAULTS.params)) setKnob(name, value);
  $("tau-auto").checked = false;
  updateTauAuto();
}

// tau "auto": the server uses (first calibrating) the model's own threshold.
function updateTauAuto() {
  const auto = $("tau-auto").checked;
  $("tau").disabled = $("tau-range").disabled = auto;
}

function decodeFields() {
  const fields = { method: $("method").value };
  for (const name of KNOBS) {
    const input = $(name);
    if (input.disabled || input.value === "") continue;  // empty: the server's default; disabled: see below
    const value = Number(input.value);
    if (!Number.isFinite(value)) throw new Error(`${name} must be a number`);
    fields[name] = value;
  }
  if ($("tau-auto").checked) fields.tau = "auto";  // the number box is disabled meanwhile
  return fields;
}

// ---------------------------------------------------------------- rendering tokens

// A token's text with its invisible characters shown (for the detail panel).
function visible(text) {
  return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function percent(x) { return (x * 100).toFixed(1) + "%"; }

function tokenSpan(text, step) {
  const span = el("span", "tok", text);
  if (step) {
    span.step = step;
    span.dataset.i = step.index;
    span.style.setProperty("--h", Math.min(1, Math.max(0, step.entropy)).toFixed(3));
    if (step.soft) span.classList.add("soft");
  }
  return span;
}

// One assistant message: where its tokens go and what it counted.
class AnswerView {
  constructor(method, tauAuto = false) {
    this.root = el("article", "msg assistant");
    this.root.dataset.state = "streaming";
    this.root.append(el("div", "role", `assistant \u00b7 ${method}`));
    this.thinking = el("details", "thinking");
    this.thinking.open = true;
    this.thinking.hidden = true;
    const summary = el("summary");
    summary.append("Thinking ", el("span", "count"));
    this.thinking.append(summary, el("div", "body"));
    this.answer = el("div", "answer");
    this.meta = el("div", "meta");
    this.root.append(this.thinking, this.answer, this.meta);
    this.steps = [];
    this.thinkingSteps = new Set();
    this.inThink = false;
    this.sawThinkOpen = false;
    this.content = "";       // the answer's text outside the thinking span (sent back as history)
    this.firstTokenAt = null;
    this.summary = null;
    this.tauAuto = tauAuto;   // the request asked for tau "auto"
    this.usage = null;
  }

  get thinkingBody() { return this.thinking.querySelector(".body"); }

  // Text of one step: content (possibly with <think> tags) or reasoning_content.
  addText(text, step, reasoning) {
    if (reasoning) {
      this.place(text, step, true);
      return;
    }
    let rest = text;
    while (rest) {
      if (!this.inThink && !this.sawThinkOpen) {
        // A closing tag with no opening one: the chat template opened the span in the
        // prompt, so everything so far was thinking.
        const close = rest.indexOf(THINK_CLOSE);
        const open = rest.indexOf(THINK_OPEN);
        if (close >= 0 && (open < 0 || close < open)) {
          this.place(rest.slice(0, close), step, false);
          this.adoptEarlierAsThinking();
          rest = rest.slice(close + THINK_CLOSE.length);
          continue;
        }
      }
      const tag = this.inThink ? THINK_CLOSE : THINK_OPEN;
      const at = rest.indexOf(tag);
      if (at < 0) {
        this.place(rest, step, this.inThink);
        return;
      }
      this.place(rest.slice(0, at), step, this.inThink);
      this.inThink = tag === THINK_OPEN;
      if (this.inThink) {
        this.sawThinkOpen = true;
        this.thinking.hidden = false;
      }
      rest = rest.slice(at + tag.length);
    }
  }

  adoptEarlierAsThinking() {
    this.sawThinkOpen = true;
    for (const node of [...this.answer.childNodes]) {
      this.thinkingBody.append(node);
      if (node.step) this.thinkingSteps.add(node.step.index);
    }
    this.content = "";
    this.thinking.hidden = false;
  }

  place(text, step, thinking) {
    if (!text) return;
    const span = tokenSpan(text, step);
    // A soft step shows its sampled token but feeds a mixture pushed away from it, so the
    // next token sometimes repeats it ("has has"): shown, joined to the soft step it echoes.
    if (step && this.lastStep && this.lastStep.soft && step.token === this.lastStep.token) {
      span.classList.add("soft-repeat");
      span.title = "repeats the soft step before it (the model read a mixture, not that token)";
    }
    if (step) this.lastStep = step;
    if (thinking) {
      this.thinkingBody.append(span);
      this.thinking.hidden = false;
      if (step) this.thinkingSteps.add(step.index);
    } else {
      this.answer.append(span);
      this.content += text;
    }
  }

  // Latent steps (method latent) show no token: a marker each, before the token they led to,
  // whose tip lists the top tokens of that step's logits. Not part of the content.
  placeLatent(markers, thinking) {
    for (const m of markers) {
      const span = el("span", "tok latent", "\u25c7");
      span.step = { index: `latent step ${m.step}`, token_text: "\u25c7", latent: true, soft: false,
                    entropy: m.entropy, top_ids: m.top_ids, top_tokens: m.top_tokens, top_probs: m.top_probs };
      span.style.setProperty("--h", Math.min(1, Math.max(0, m.entropy)).toFixed(3));
      (thinking ? this.thinkingBody : this.answer).append(span);
      if (thinking) this.thinking.hidden = false;
    }
  }

  // One streamed chunk of /v1/chat/completions.
  feed(chunk) {
    if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
    if (chunk.usage) this.usage = chunk.usage;
    const choice = (chunk.choices || [])[0];
    const step = chunk.selar && "index" in chunk.selar ? chunk.selar : null;
    if (chunk.selar && !step) this.summary = chunk.selar;  // the last chunk's summary
    if (step) {
      if (this.firstTokenAt === null) this.firstTokenAt = performance.now();
      this.steps.push(step);
    }
    if (!choice) return;
    const delta = choice.delta || {};
    if (step && step.latent) this.placeLatent(step.latent, !!delta.reasoning_content);
    if (delta.reasoning_content) this.addText(delta.reasoning_content, step, true);
    if (delta.content) this.addText(delta.content, step, false);
    if (choice.finish_reason) this.finishReason = choice.finish_reason;
  }

  stats() {
    const tokens = this.usage ? this.usage.completion_tokens : this.steps.length;
    const soft = this.summary ? this.summary.soft_steps : this.steps.filter((s) => s.soft).length;
    let speed = 0;
    if (this.summary) speed = this.summary.tokens_per_second;
    else if (this.firstTokenAt !== null && this.steps.length > 1) {
      speed = (this.steps.length - 1) / ((performance.now() - this.firstTokenAt) / 1000);
    }
    return { tokens, soft, share: tokens ? soft / tokens : 0, speed };
  }

  render() {
    const s = this.stats();
    const thinkCount = this.thinkingSteps.size;
    if (thinkCount) {
      const softThinking = this.steps.filter((x) => x.soft && this.thinkingSteps.has(x.index)).length;
      this.thinking.querySelector(".count").textContent =
        `\u00b7 ${thinkCount} tokens, ${softThinking} soft`;
    }
    this.meta.replaceChildren(
      el("span", "", `${s.tokens} tokens`),
      el("span", "", `${s.soft} soft (${percent(s.share)})`),
      el("span", "", `${s.speed.toFixed(1)} tokens/s`),
    );
    // The gate's threshold as the server used it (with tau "auto": the calibrated value).
    if (this.summary && typeof this.summary.tau === "number") {
      this.meta.append(el("span", "tau", `tau ${this.summary.tau}${this.tauAuto ? " (auto)" : ""}`));
    }
    if (this.finishReason === "length") this.meta.append(el("span", "flag", "stopped at max tokens"));
    if (this.root.dataset.state === "stopped") this.meta.append(el("span", "flag", "stopped"));
    showStats(s);
  }
}

function showStats(s) {
  $("stat-tokens").textContent = s.tokens;
  $("stat-soft").textContent = percent(s.share);
  $("stat-speed").textContent = s.speed.toFixed(1);
}

function setState(text) { $("stat-state").textContent = text || ""; }

// ---------------------------------------------------------------- token detail

function candidateTable(cls, caption, tokens, values, chosen) {
  const table = el("table", cls);
  table.append(el("caption", "", caption));
  const scale = Math.max(1e-9, ...values.map(Math.abs));
  tokens.forEach((token, i) => {
    const row = el("tr", token === chosen ? "chosen" : "");
    const cell = el("td", "t", visible(token));
    cell.dataset.token = token;
    cell.title = token;
    const bar = el("i");
    bar.style.setProperty("--w", (Math.abs(values[i]) / scale).toFixed(4));
    if (values[i] < 0) bar.classList.add("negative");
    const barCell = el("td", "bar");
    barCell.append(bar);
    const value = el("td", "p", percent(values[i]));
    value.dataset.value = values[i];
    row.append(cell, barCell, value);
    table.append(row);
  });
  return table;
}

function showTip(span) {
  const step = span.step;
  if (!step) return;
  const tip = $("tip");
  const head = el("div", "head");
  head.append(el("code", "", visible(step.token_text)));
  if (step.soft) head.append(el("span", "badge soft", "soft step"));
  if (step.latent) head.append(el("span", "badge latent", "no token: the hidden state was fed"));
  if (span.classList.contains("soft-repeat")) head.append(el("span", "badge soft", "repeat after a soft step"));
  head.append(el("span", "step", step.latent ? step.index : `step ${step.index}`));
  tip.replaceChildren(head, el("div", "entropy", `gate entropy ${step.entropy.toFixed(3)}`));
  tip.append(candidateTable("cands", `top-${step.top_ids.length} candidates`, step.top_tokens,
                            step.top_probs, step.token_text));
  if (step.soft) {
    tip.append(candidateTable("mix", "mixture weights \u00b7 the next input", step.mix_tokens,
                              step.mix_weights, null));
  }
  tip.hidden = false;
  placeTip(tip, span.getBoundingClientRect());
}

function placeTip(tip, rect) {
  const margin = 8;
  const width = tip.offsetWidth;
  const height = tip.offsetHeight;
  let left = Math.min(Math.max(margin, rect.left), window.innerWidth - width - margin);
  let top = rect.bottom + 6;
  if (top + height > window.innerHeight - margin) top = Math.max(margin, rect.top - height - 6);
  tip.style.left = left + "px";
  tip.style.top = top + "px";
}

function hideTip() {
  $("tip").hidden = true;
  if (state.pinned) state.pinned.classList.remove("pinned");
  state.pinned = null;
}

function initTips() {
  const messages = $("messages");
  messages.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".tok");
    if (span && !state.pinned) showTip(span);
  });
  messages.addEventListener("mouseout", (event) => {
    const span = event.target.closest(".tok");
    if (span && !state.pinned && !(event.relatedTarget && event.relatedTarget.closest("#tip"))) {
      $("tip").hidden = true;
    }
  });
  // Tap (or click) pins the detail; tapping elsewhere lets it go.
  document.addEventListener("click", (event) => {
    const span = event.target.closest && event.target.closest("#messages .tok");
    if (span && span.step) {
      if (state.pinned === span) { hideTip(); return; }
      hideTip();
      state.pinned = span;
      span.classList.add("pinned");
      showTip(span);
    } else if (!event.target.closest || !event.target.closest("#tip")) {
      hideTip();
    }
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") hideTip(); });
  messages.addEventListener("scroll", () => { if (!state.pinned) $("tip").hidden = true; });
}

// ---------------------------------------------------------------- conversation

function addUserMessage(text) {
  const article = el("article", "msg user");
  article.append(el("div", "role", "you"), el("div", "bubble", text));
  $("messages").append(article);
}

function nearBottom(box) { return box.scrollHeight - box.scrollTop - box.clientHeight < 80; }

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  let fields;
  try {
    fields = decodeFields();
  } catch (error) {
    setState(error.message);
    return;
  }
  $("empty").hidden = true;
  hideTip();
  addUserMessage(text);
  const history = state.history;  // "New chat" replaces it: an answer it stopped stays out of the next
  history.push({ role: "user", content: text });
  const view = new AnswerView(fields.method, fields.method === "selar" && fields.tau === "auto");
  const box = $("messages");
  box.append(view.root);
  box.scrollTop = box.scrollHeight;
  const body = Object.assign({ messages: history.slice(), stream: true,
                               stream_options: { include_usage: true }, selar_trace: true }, fields);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  // A first tau "auto" request for this model waits while the server calibrates it.
  setState(view.tauAuto ? "generating (tau auto: calibrated on first use)\u2026" : "generating\u2026");
  let ended = "done";
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    await readEvents(response, (chunk) => {
      const follow = nearBottom(box);
      view.feed(chunk);
      view.render();
      if (follow) box.scrollTop = box.scrollHeight;
    });
  } catch (error) {
    if (error.name === "AbortError") {
      ended = "stopped";
    } else {
      ended = "error";
      view.root.append(el("div", "error", error.message));
    }
  } finally {
    view.root.dataset.state = ended;
    history.push({ role: "assistant", content: view.content });
    if (view.root.isConnected) view.render();
    state.controller = null;
    setBusy(false);
    setState(ended === "done" ? "" : ended);
    $("input").focus();
  }
}

// Server-sent events: "data: {json}" blocks separated by blank lines, then "data: [DONE]".
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  hideTip();
  for (const node of [...$("messages").children]) if (node.id !== "empty") node.remove();
  $("empty").hidden = false;
  showStats({ tokens: 0, share: 0, speed: 0 });
  setState("");
}

function initComposer() {
  const input = $("input");
  const grow = () => {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, window.innerHeight * 0.4) + "px";
  };
  input.addEventListener("input", grow);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || state.busy) return;
    input.value = "";
    grow();
    send(text);
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
}

// ---------------------------------------------------------------- theme and layout

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("theme-toggle").textContent = theme === "dark" ? "Light" : "Dark";
}

function initTheme() {
  const saved = localStorage.getItem(THEME_STORAGE);
  const system = window.matchMedia("(prefers-color-scheme: dark)");
  applyTheme(saved || (system.matches ? "dark" : "light"));
  system.addEventListener("change", (event) => {
    if (!localStorage.getItem(THEME_STORAGE)) applyTheme(event.matches ? "dark" : "light");
  });
  $("theme-toggle").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem(THEME_STORAGE, next);
    applyTheme(next);
  });
}

function initPanelToggle() {
  const panel = $("panel");
  const toggle = $("panel-toggle");
  toggle.addEventListener("click", (event) => {
    event.stopPropagation();
    const open = panel.classList.toggle("open");
    toggle.setAttribute("aria-expanded", String(open));
  });
  document.addEventListener("click", (event) => {
    if (panel.classList.contains("open") && !panel.contains(event.target)) {
      panel.classList.remove("open");
      toggle.setAttribute("aria-expanded", "false");
    }
  });
}

initTheme();
initPanel();
initPanelToggle();
initTips();
initComposer();
loadModel();
$("input").focus();

// For tests and the curious: render chunks into a new answer without a request.
window.selarChat = {
  render(chunks, method = "selar") {
    const view = new AnswerView(method);
    $("empty").hidden = true;
    $("messages").append(view.root);
    for (const chunk of chunks) view.feed(chunk);
    view.root.dataset.state = "done";
    view.render();
    return view.content;
  },
};
