// The console's only way to the server: Ultra's public API, as any client calls it.
// The credential lives in memory only: an API key the user pasted, or an access
// token. A signed-in session keeps its refresh token in an HttpOnly cookie the page
// cannot read; the `X-Ultra-Session: cookie` header on the calls that use it is what
// another site's page cannot send (cross-site request forgery).

const SESSION_HEADER = { "X-Ultra-Session": "cookie" };

export class Problem extends Error {
  constructor(status, body) {
    const detail = body && (body.detail || body.title);
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }

  /** Each field error as "field: message", or the detail alone. */
  lines() {
    const errors = (this.body && this.body.errors) || [];
    return errors.length ? errors.map((e) => `${e.field}: ${e.message}`) : [this.message];
  }
}

let credential = null; // { kind: "key" | "token", value }

export const session = {
  get signedIn() { return credential !== null; },
  get kind() { return credential && credential.kind; },
  useKey(key) { credential = { kind: "key", value: key.trim() }; },

  /** Email and password: an access token now, the refresh token as the cookie. */
  async signIn(email, password) {
    const tokens = await send("POST", "/v1/auth/login", { email, password }, SESSION_HEADER, false);
    credential = { kind: "token", value: tokens.access_token };
  },

  /**
   * A session the cookie still holds (after a reload, or an expired access token):
   * true if there was one. One refresh at a time, in this tab and across tabs: a
   * refresh token works once, and presenting it twice revokes the whole login.
   */
  resume() {
    refreshing ??= exclusively(async () => {
      try {
        const tokens = await send("POST", "/v1/auth/refresh", {}, SESSION_HEADER, false);
        credential = { kind: "token", value: tokens.access_token };
        return true;
      } catch {
        return false;
      }
    }).finally(() => { refreshing = null; });
    return refreshing;
  },

  /** Revokes the session's refresh tokens (and clears the cookie); throws if it could not. */
  async signOut() {
    if (credential && credential.kind === "token") {
      await send("POST", "/v1/auth/logout", {}, SESSION_HEADER, false);
    }
    credential = null;
  },

  /** Forgets the credential (the server refused it). */
  forget() { credential = null; },
};

let refreshing = null;

/** Runs `task` holding the console's refresh lock, shared by this origin's tabs. */
function exclusively(task) {
  return navigator.locks ? navigator.locks.request("ultra-refresh", task) : task();
}

export function register(email, password) {
  return send("POST", "/v1/auth/register", { email, password }, {}, false);
}

/** Called when the server refuses the credential for good (set by the app). */
let onSignedOut = () => {};
export function whenSignedOut(callback) { onSignedOut = callback; }

/** An authenticated call: the parsed JSON answer, or a thrown Problem. */
export async function api(method, path, body, headers = {}) {
  const used = credential;
  try {
    return await send(method, path, body, headers, true);
  } catch (err) {
    if (!(err instanceof Problem) || err.status !== 401 || !credential) throw err;
    // Another call may have refreshed meanwhile; else an expired access token is
    // refreshed once through the cookie. Either way, one retry.
    if (credential !== used || (credential.kind === "token" && await session.resume())) {
      return send(method, path, body, headers, true);
    }
    credential = null;
    onSignedOut();
    throw err;
  }
}

async function send(method, path, body, headers, authenticated) {
  const init = { method, headers: { Accept: "application/json", ...headers }, credentials: "same-origin" };
  if (authenticated && credential) init.headers.Authorization = `Bearer ${credential.value}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let parsed = null;
  try { parsed = text ? JSON.parse(text) : null; } catch { parsed = null; }
  if (!response.ok) throw new Problem(response.status, parsed);
  return parsed;
}

/**
 * Follows a job's events with EventSource (a stream ticket stands in for the
 * Authorization header EventSource cannot send). `on(kind, data)` gets every event;
 * the browser reconnects by itself with Last-Event-ID after a network error, and the
 * ticket stays good for the job's stream, so nothing is lost or repeated. A stream the
 * server ends for good (an expired ticket, too many streams) calls `closed()`.
 * Returns a function that stops it.
 */
export async function follow(jobId, on, closed) {
  const ticket = await api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/stream-ticket`);
  const source = new EventSource(ticket.url);
  let ended = false;
  const kinds = ["queued", "started", "step.started", "step.completed", "step.failed", "token", "snapshot",
    "succeeded", "failed", "cancelled"];
  for (const kind of kinds) {
    source.addEventListener(kind, (event) => {
      let data = null;
      try { data = JSON.parse(event.data); } catch { return; }
      if (kind === "succeeded" || kind === "failed" || kind === "cancelled") { ended = true; source.close(); }
      on(kind, data);
    });
  }
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED && !ended) closed();
  });
  return () => { ended = true; source.close(); };
}