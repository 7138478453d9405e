// The Ultra web console: sign in, ask several models at once, watch them answer,
// review each other and converge, live; the history of one's jobs; administration.
// Model text is only ever set as text (textContent), never parsed as HTML.

import { api, follow, Problem, register, session, whenSignedOut } from "./api.js";

const main = document.getElementById("main");
const TERMINAL = ["succeeded", "failed", "cancelled"];
let me = null;
let stopWatching = null;

// ---- small DOM helpers -------------------------------------------------------

/** An element with attributes and children (strings become text nodes). */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "text") element.textContent = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      element.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return element;
}

function show(...children) {
  main.replaceChildren(...children);
  main.focus({ preventScroll: true });
}

function toast(message) {
  const line = h("p", { text: message });
  document.getElementById("toast").append(line);
  setTimeout(() => line.remove(), 6000);
}

function problemLines(err) {
  return err instanceof Problem ? err.lines() : [String(err && err.message ? err.message : err)];
}

function badge(status) {
  return h("span", { class: `badge s-${status}`, "data-status": status, text: status });
}

const money = (usd) => `$${Number(usd || 0).toFixed(usd && usd < 0.01 ? 6 : 4)}`;
const seconds = (from, to) => (from && to ? `${((new Date(to) - new Date(from)) / 1000).toFixed(2)} s` : "");

// ---- routing -------------------------------------------------------------------

const routes = [
  [/^#\/signin$/, signInView],
  [/^#\/ask$/, askView],
  [/^#\/jobs\/([0-9a-f-]{36})$/, (id, ticket) => watchView(id, ticket)],
  [/^#\/history$/, historyView],
  [/^#\/admin$/, adminView],
];

// Each navigation's number: a view still loading when the user moves on must not
// draw over the page they moved to.
let navigation = 0;
const current = (ticket) => ticket === navigation;

async function route() {
  const ticket = ++navigation;
  if (stopWatching) { stopWatching(); stopWatching = null; }
  const hash = location.hash || "#/ask";
  if (!session.signedIn && hash !== "#/signin") {
    sessionStorage.setItem("ultra.after", hash);
    location.hash = "#/signin";
    return;
  }
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === hash) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [pattern, view] of routes) {
    const match = hash.match(pattern);
    if (match) {
      try {
        await view(...match.slice(1), ticket);
      } catch (err) {
        if (current(ticket)) show(h("p", { class: "error", text: problemLines(err).join("; ") }));
      }
      return;
    }
  }
  location.hash = "#/ask";
}

async function signedIn() {
  me = await api("GET", "/v1/me");
  document.getElementById("nav").hidden = false;
  document.getElementById("who").textContent = `${me.email} · ${me.tier}`;
  document.getElementById("nav-admin").hidden = me.role !== "admin";
  // Where the user was going: the page asked for before signing in, or (after a
  // reload) the page itself.
  const after = sessionStorage.getItem("ultra.after") || location.hash;
  sessionStorage.removeItem("ultra.after");
  const target = after && after !== "#/signin" ? after : "#/ask";
  if (location.hash !== target) location.hash = target; // hashchange routes
  else await route();
}

function signedOut() {
  me = null;
  document.getElementById("nav").hidden = true;
  if (location.hash !== "#/signin") sessionStorage.setItem("ultra.after", location.hash);
  location.hash = "#/signin";
}

// The server refused the credential for good (a revoked key, an ended session).
whenSignedOut(() => { toast("Please sign in again."); signedOut(); });

document.getElementById("sign-out").addEventListener("click", async () => {
  try {
    await session.signOut();
  } catch (err) {
    toast(`Could not sign out: ${problemLines(err).join("; ")}`);
    return;
  }
  signedOut();
  sessionStorage.removeItem("ultra.after"); // signing out is not a detour to come back from
});

// The skip link moves focus; it is not a route.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

// ---- sign in -------------------------------------------------------------------

function signInView() {
  const status = h("div", { role: "alert", class: "error" });
  const email = h("input", { id: "email", type: "email", autocomplete: "username", required: true });
  const password = h("input", { id: "password", type: "password", autocomplete: "current-password", required: true });
  const key = h("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "ultra_…" });
  const fail = (err) => status.replaceChildren(...problemLines(err).map((l) => h("p", { text: l })));
  const withPassword = h("form", {
    class: "card", "aria-labelledby": "signin-title",
    onsubmit: async (event) => {
      event.preventDefault();
      try { await session.signIn(email.value, password.value); await signedIn(); } catch (err) { fail(err); }
    },
  },
  h("h1", { id: "signin-title", text: "Sign in" }),
  h("label", { for: "email", text: "Email" }), email,
  h("label", { for: "password", text: "Password" }), password,
  h("p", {}, h("button", { type: "submit", text: "Sign in" }), " ",
    h("button", {
      type: "button", class: "secondary", text: "Register",
      onclick: async () => {
        try {
          await register(email.value, password.value);
          await session.signIn(email.value, password.value);
          await signedIn();
        } catch (err) { fail(err); }
      },
    })));
  const withKey = h("form", {
    class: "card", "aria-labelledby": "key-title",
    onsubmit: async (event) => {
      event.preventDefault();
      session.useKey(key.value);
      try { await signedIn(); } catch (err) { await session.signOut(); fail(err); }
    },
  },
  h("h2", { id: "key-title", text: "Or use an API key" }),
  h("label", { for: "api-key", text: "API key" }), key,
  h("p", { class: "muted", text: "Kept in this tab's memory only." }),
  h("button", { type: "submit", text: "Use key" }));
  show(status, withPassword, withKey);
}

// ---- ask -------------------------------------------------------------------------

async function askView(ticket) {
  const [{ models }, { patterns }] = await Promise.all([api("GET", "/v1/models"), api("GET", "/v1/patterns")]);
  const prompt = h("textarea", { id: "prompt", required: true });
  const modelBoxes = models.map((m, i) => {
    const box = h("input", { type: "checkbox", name: "model", value: m.id, checked: i < 3 && m.available });
    return h("label", { class: "model" }, box, h("span", {},
      h("strong", { text: m.id }), " ",
      h("span", { class: `badge s-${m.available ? "ok" : "down"}`, text: m.available ? "available" : "unavailable" }),
      h("small", { text: `$${m.input_price_per_mtok}/$${m.output_price_per_mtok} per M tokens in/out · ${m.description}` })));
  });
  const pattern = h("select", { id: "pattern" }, patterns.map((p) => h("option", { value: p.name, text: p.name })));
  const describe = h("p", { class: "muted", id: "pattern-description" });
  const explain = () => {
    const chosen = patterns.find((p) => p.name === pattern.value);
    describe.textContent = chosen ? `${chosen.description} (stages: ${chosen.stages.join(" → ")})` : "";
  };
  if (patterns.some((p) => p.name === "direct")) pattern.value = "direct";
  pattern.addEventListener("change", explain);
  explain();
  const number = (id, attributes) => h("input", { id, type: "number", ...attributes });
  const maxTokens = number("max-tokens", { min: 1, max: 32768, placeholder: "default" });
  const temperature = number("temperature", { min: 0, max: 2, step: 0.1, placeholder: "default" });
  const minModels = number("min-models", { min: 1, placeholder: "1" });
  const timeout = number("timeout", { min: 1, placeholder: "default" });
  const synthesis = h("select", { id: "synthesis-model" }, h("option", { value: "", text: "first that answers" }),
    models.map((m) => h("option", { value: m.id, text: m.id })));
  const status = h("div", { role: "alert", class: "error" });
  const submit = h("button", { type: "submit", text: "Ask" });
  // One key per form: a double click, or a retry after a network error, makes one job.
  let idempotencyKey = crypto.randomUUID();
  const form = h("form", {
    class: "card", "aria-labelledby": "ask-title",
    oninput: () => { idempotencyKey = crypto.randomUUID(); },
    onsubmit: async (event) => {
      event.preventDefault();
      const options = {};
      if (maxTokens.value) options.max_tokens = Number(maxTokens.value);
      if (temperature.value) options.temperature = Number(temperature.value);
      if (minModels.value) options.min_models = Number(minModels.value);
      if (timeout.value) options.timeout_s = Number(timeout.value);
      if (synthesis.value) options.synthesis_model = synthesis.value;
      const chosen = modelBoxes.map((l) => l.querySelector("input")).filter((b) => b.checked).map((b) => b.value);
      submit.disabled = true;
      try {
        const job = await api("POST", "/v1/analyze", { prompt: prompt.value, models: chosen, pattern: pattern.value, options },
          { "Idempotency-Key": idempotencyKey });
        location.hash = `#/jobs/${job.id}`;
      } catch (err) {
        status.replaceChildren(...problemLines(err).map((l) => h("p", { text: l })));
      } finally {
        submit.disabled = false;
      }
    },
  },
  h("h1", { id: "ask-title", text: "Ask several models" }),
  h("label", { for: "prompt", text: "Prompt" }), prompt,
  h("fieldset", {}, h("legend", { text: "Models" }), h("div", { class: "models" }, modelBoxes)),
  h("div", { class: "row" },
    h("div", {}, h("label", { for: "pattern", text: "Pattern" }), pattern, describe),
    h("div", {}, h("label", { for: "synthesis-model", text: "Synthesis model" }), synthesis)),
  h("div", { class: "row" },
    h("div", {}, h("label", { for: "max-tokens", text: "Max tokens" }), maxTokens),
    h("div", {}, h("label", { for: "temperature", text: "Temperature" }), temperature),
    h("div", {}, h("label", { for: "min-models", text: "Min models" }), minModels),
    h("div", {}, h("label", { for: "timeout", text: "Timeout (s)" }), timeout)),
  status, h("p", {}, submit));
  if (!current(ticket)) return;
  show(form);
  prompt.focus();
}

// ---- watch -----------------------------------------------------------------------

/** One step's box: its text (set and appended as text only) and its figures. */
class StepBox {
  constructor(stage, model) {
    this.bytes = 0; // the UTF-8 length of the text shown: where the next token goes
    this.status = h("span", { class: "badge s-pending", text: "pending" });
    this.figures = h("span", { class: "figures" });
    this.body = h("pre", { class: "text", "data-stage": stage, "data-model": model });
    this.error = h("p", { class: "error" });
    this.element = h("section", { class: "step", "aria-label": `${stage}, ${model}` },
      h("div", { class: "step-head" }, h("span", { text: stage }), this.status, this.figures), this.body, this.error);
  }

  setStatus(status) { this.status.className = `badge s-${status}`; this.status.textContent = status; }

  setText(text) { this.body.textContent = text; this.bytes = new TextEncoder().encode(text).length; }

  /** A token at byte offset `index`: appended if it continues the text, else skipped. */
  token(delta, index) {
    if (index !== this.bytes) return;
    this.body.textContent += delta;
    this.bytes += new TextEncoder().encode(delta).length;
  }
}

async function watchView(id, ticket) {
  const job = await api("GET", `/v1/jobs/${id}`);
  const stages = await stagesOf(job.pattern);
  const boxes = new Map();
  const columns = h("div", { class: "columns" });
  const synthesisArea = h("div", { class: "synthesis" });
  const columnOf = new Map();
  for (const model of job.models) {
    const column = h("article", { class: "column", "data-model": model }, h("h3", {}, h("span", { text: model })));
    columnOf.set(model, column);
    columns.append(column);
  }
  const box = (stage, model) => {
    const key = `${stage}/${model}`;
    if (!boxes.has(key)) {
      const step = new StepBox(stage, model);
      boxes.set(key, step);
      if (stage === "synthesis") {
        synthesisArea.append(h("article", { class: "column", "data-stage": "synthesis" },
          h("h3", {}, h("span", { text: `Synthesis · ${model}` })), step.element));
      } else {
        let column = columnOf.get(model);
        if (!column) { // a synthesis-only model answering an earlier stage cannot happen; be safe
          column = h("article", { class: "column", "data-model": model }, h("h3", {}, h("span", { text: model })));
          columnOf.set(model, column);
          columns.append(column);
        }
        column.append(step.element);
      }
    }
    return boxes.get(key);
  };
  for (const model of job.models) box("initial", model);
  if (stages.includes("meta")) for (const model of job.models) box("meta", model);

  const status = badge(job.status);
  const totals = h("span", { class: "muted" });
  const failure = h("p", { class: "error", role: "alert" });
  const cancel = h("button", {
    type: "button", class: "danger", text: "Cancel",
    onclick: async () => {
      try { await api("POST", `/v1/jobs/${id}/cancel`); toast("Cancelling…"); } catch (err) { toast(problemLines(err).join("; ")); }
    },
  });
  const prompt = h("pre", { class: "text card", id: "job-prompt" });
  prompt.textContent = job.prompt;
  const setStatus = (value) => {
    status.className = `badge s-${value}`;
    status.dataset.status = value;
    status.textContent = value;
    cancel.hidden = TERMINAL.includes(value);
  };
  const completed = (step) => {
    const target = box(step.stage, step.model);
    target.setStatus(step.status || "succeeded");
    if (step.output !== undefined && step.output !== null) target.setText(step.output);
    const usage = step.usage ? `${step.usage.input_tokens}+${step.usage.output_tokens} tokens` : "";
    target.figures.textContent = [seconds(step.started_at, step.finished_at), usage, step.cost_usd ? money(step.cost_usd) : "",
      step.cached ? "cached" : ""].filter(Boolean).join(" · ");
    if (step.error) target.error.textContent = `${step.error.code}: ${step.error.message}`;
  };
  const refresh = async () => {
    const now = await api("GET", `/v1/jobs/${id}`);
    for (const step of now.steps) completed(step);
    setStatus(now.status);
    totals.textContent = `${now.usage.input_tokens + now.usage.output_tokens} tokens · ${money(now.cost_usd)}`;
    if (now.error) failure.textContent = `${now.error.code}: ${now.error.message}`;
  };
  // Filled before it is shown: what the page shows is never less than the job had.
  await refresh();
  if (!current(ticket)) return;
  show(
    h("div", { class: "card" },
      h("h1", {}, "Job ", h("code", { text: id }), " ", status),
      h("p", { class: "muted" }, `${job.pattern} · ${job.models.join(", ")} · `, totals),
      prompt, failure, cancel),
    columns, synthesisTitle(stages), synthesisArea);
  if (TERMINAL.includes(status.dataset.status)) return;
  const onEvent = async (kind, event) => {
    switch (kind) {
      case "started": setStatus("running"); break;
      case "step.started": { // a step run again starts from nothing
        const step = box(event.data.stage, event.data.model);
        step.setStatus("running");
        step.setText("");
        break;
      }
      case "snapshot": box(event.stage, event.model).setText(event.text); break;
      case "token": box(event.stage, event.model).token(event.delta, event.index); break;
      case "step.completed": completed({ ...event.data, status: "succeeded" }); break;
      case "step.failed": completed({ ...event.data, status: "failed" }); break;
      case "succeeded": case "failed": case "cancelled": await refresh(); break;
      default: break;
    }
  };
  // A stream the server ended for good (an expired ticket, too many open streams):
  // catch up from the job and follow again, from the start, after a pause.
  let pause = 1000;
  const watch = async () => {
    if (!current(ticket)) return;
    const stop = await follow(id, onEvent, () => {
      toast("The live view was cut; reconnecting…");
      setTimeout(async () => {
        try { await refresh(); } catch { /* the next attempt says why */ }
        if (!TERMINAL.includes(status.dataset.status)) watch().catch((err) => toast(problemLines(err).join("; ")));
      }, pause);
      pause = Math.min(pause * 2, 30000);
    });
    if (current(ticket)) stopWatching = stop;
    else stop();
  };
  await watch();
}

function synthesisTitle(stages) {
  return stages.includes("synthesis") ? h("h2", { text: "Synthesis" }) : null;
}

let patternStages = null;
async function stagesOf(name) {
  if (!patternStages) {
    const { patterns } = await api("GET", "/v1/patterns");
    patternStages = new Map(patterns.map((p) => [p.name, p.stages]));
  }
  return patternStages.get(name) || ["initial"];
}

// ---- history -----------------------------------------------------------------------

async function historyView(ticket) {
  const filter = h("select", { id: "status-filter" }, h("option", { value: "", text: "any status" }),
    ["queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s, text: s })));
  const rows = h("tbody");
  const more = h("button", { type: "button", class: "secondary", text: "More", hidden: true });
  let cursor = null;
  const load = async (reset) => {
    if (reset) { rows.replaceChildren(); cursor = null; }
    const query = new URLSearchParams({ limit: "20" });
    if (filter.value) query.set("status", filter.value);
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `/v1/jobs?${query}`);
    for (const job of page.jobs) {
      rows.append(h("tr", {},
        h("td", {}, h("a", { href: `#/jobs/${job.id}`, text: new Date(job.created_at).toLocaleString() })),
        h("td", {}, badge(job.status)), h("td", { text: job.pattern }), h("td", { text: job.models.join(", ") })));
    }
    cursor = page.next_cursor || null;
    more.hidden = !cursor;
  };
  filter.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
  const usage = me.usage;
  const budget = me.limits.daily_tokens;
  const spent = usage.used_tokens + usage.reserved_tokens;
  const share = budget ? Math.min(100, (100 * spent) / budget) : 0;
  if (!current(ticket)) return;
  show(
    h("div", { class: "card", "aria-labelledby": "usage-title" },
      h("h1", { id: "usage-title", text: "Today" }),
      h("p", {}, `${usage.used_tokens} tokens used, ${usage.reserved_tokens} reserved, ${usage.remaining_tokens} of `
        + `${budget} left · ${usage.jobs} jobs · ${money(usage.cost_usd)} spent · ${usage.active_jobs} in progress`),
      h("div", { class: "meter", role: "meter", "aria-label": "Daily token budget used", "aria-valuemin": 0,
        "aria-valuemax": 100, "aria-valuenow": Math.round(share) }, meterBar(share))),
    h("h1", { text: "History" }),
    h("label", { for: "status-filter", text: "Status" }), filter,
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Submitted", "Status", "Pattern", "Models"].map((t) => h("th", { scope: "col", text: t })))), rows)),
    h("p", {}, more));
  await load(true);
}

/** The meter's bar, sized through the CSSOM (the policy forbids inline style attributes). */
function meterBar(share) {
  const bar = h("div");
  bar.style.width = `${share}%`;
  return bar;
}

// ---- admin -------------------------------------------------------------------------

async function adminView(ticket) {
  if (!me || me.role !== "admin") { show(h("p", { class: "error", text: "Administrators only." })); return; }
  const [queues, letters] = await Promise.all([api("GET", "/v1/admin/queues"), api("GET", "/v1/admin/dead-letters")]);
  const userRow = (u) => {
    const tier = h("input", { type: "text", value: u.tier, "aria-label": `Tier of ${u.email}`, size: 10 });
    const disabled = h("input", { type: "checkbox", checked: u.disabled, "aria-label": `${u.email} disabled` });
    const save = h("button", {
      type: "button", class: "secondary", text: "Save",
      onclick: async () => {
        try {
          await api("PATCH", `/v1/admin/users/${u.id}`, { tier: tier.value, disabled: disabled.checked });
          toast(`Saved ${u.email}`);
        } catch (err) { toast(problemLines(err).join("; ")); }
      },
    });
    return h("tr", {}, h("td", { text: u.email }), h("td", { text: u.role }), h("td", {}, tier), h("td", {}, disabled), h("td", {}, save));
  };
  const userRows = h("tbody");
  const emailFilter = h("input", { id: "user-filter", type: "text", placeholder: "part of an email address" });
  const moreUsers = h("button", { type: "button", class: "secondary", text: "More users", hidden: true });
  let userCursor = null;
  const loadUsers = async (reset) => {
    if (reset) { userRows.replaceChildren(); userCursor = null; }
    const query = new URLSearchParams({ limit: "50" });
    if (emailFilter.value.trim()) query.set("email", emailFilter.value.trim());
    if (userCursor) query.set("cursor", userCursor);
    const page = await api("GET", `/v1/admin/users?${query}`);
    userRows.append(...page.users.map(userRow));
    userCursor = page.next_cursor || null;
    moreUsers.hidden = !userCursor;
  };
  emailFilter.addEventListener("change", () => loadUsers(true).catch((err) => toast(problemLines(err).join("; "))));
  moreUsers.addEventListener("click", () => loadUsers(false).catch((err) => toast(problemLines(err).join("; "))));
  await loadUsers(true);
  const letterRows = letters.dead_letters.map((d) => h("tr", {},
    h("td", {}, h("code", { text: d.job_id })), h("td", { text: String(d.attempts) }),
    h("td", {}, h("button", {
      type: "button", class: "secondary", text: "Replay",
      onclick: async () => {
        try { await api("POST", `/v1/admin/dead-letters/${d.job_id}/replay`); toast("Replayed"); } catch (err) { toast(problemLines(err).join("; ")); }
      },
    }))));
  if (!current(ticket)) return;
  show(
    h("h1", { text: "Queues" }),
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Queue", "Role", "Ready", "Consumers"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, (queues.queues || []).map((q) => h("tr", {}, h("td", { text: q.name }), h("td", { text: q.role }),
        h("td", { text: String(q.messages) }), h("td", { text: String(q.consumers) })))))),
    h("p", { class: "muted", text: `Outbox backlog ${queues.outbox_backlog} · queued ${queues.jobs_queued} · running ${queues.jobs_running}`
      + ` · dead-lettered ${queues.dead_lettered_jobs}` + (queues.broker_error ? ` · broker: ${queues.broker_error}` : "") }),
    h("h1", { text: "Dead letters" }),
    letterRows.length ? h("div", { class: "scroll" }, h("table", {}, h("tbody", {}, letterRows))) : h("p", { class: "muted", text: "None." }),
    h("h1", { text: "Users" }),
    h("label", { for: "user-filter", text: "Find users" }), emailFilter,
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Email", "Role", "Tier", "Disabled", ""].map((t) => h("th", { scope: "col", text: t })))),
      userRows)),
    h("p", {}, moreUsers));
}

// ---- start -------------------------------------------------------------------------

window.addEventListener("hashchange", route);
(async () => {
  if (await session.resume()) {
    try { await signedIn(); return; } catch { /* fall through to sign in */ }
  }
  await route();
})();
