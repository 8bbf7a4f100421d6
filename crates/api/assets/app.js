// Tandem's dashboard: reads the node's JSON API every 2 s and on every event of
// /v1/events/stream (Server-Sent Events, read with fetch so the token can be sent as
// `Authorization: Bearer`; EventSource cannot send headers). The token the user pastes is
// kept in sessionStorage (this tab only).
"use strict";

const TOKEN_KEY = "tandem-token";
const POLL_MS = 2000;
const RETRY_MS = 2000;
const MAX_EVENTS = 500;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// An HTTP answer that is not 2xx, with the API's error message.
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) message = body.error;
  } catch (_) {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, message);
}

/// Splits SSE text into complete messages; returns [messages, rest].
function parseSse(text) {
  const messages = [];
  const blocks = text.replace(/\r\n?/g, "\n").split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    const data = [];
    let id = null;
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (data.length) messages.push({ id, data: data.join("\n") });
  }
  return [messages, rest];
}

document.addEventListener("alpine:init", () => {
  window.Alpine.data("dashboard", () => ({
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    tokenInput: "",
    needToken: false,
    error: "",
    actionError: "",
    busy: false,
    live: false,
    refreshed: "",
    cluster: null,
    nodes: [],
    targets: [],
    profiles: [],
    loadBalancers: [],
    scaleSets: [],
    databases: [],
    apps: [],
    unreachable: [],
    drill: null,
    drillFor: "60s",
    events: [],
    seen: new Set(),
    lastEventId: null,
    stream: null,
    refreshSoon: null,

    init() {
      this.tokenInput = this.token;
      this.refresh();
      setInterval(() => this.refresh(), POLL_MS);
      setInterval(() => {
        // The drill's countdown.
        if (this.drill) this.drill = { ...this.drill };
      }, 1000);
      this.follow();
    },

    headers(extra) {
      const h = { Accept: "application/json", ...(extra || {}) };
      if (this.token) h.Authorization = `Bearer ${this.token}`;
      return h;
    },

    saveToken() {
      this.token = this.tokenInput.trim();
      if (this.token) sessionStorage.setItem(TOKEN_KEY, this.token);
      else sessionStorage.removeItem(TOKEN_KEY);
      this.needToken = false;
      this.restartStream();
      this.refresh();
    },

    forgetToken() {
      this.tokenInput = "";
      this.saveToken();
    },

    async get(path) {
      const resp = await fetch(path, { headers: this.headers(), cache: "no-store" });
      if (!resp.ok) throw await errorOf(resp);
      return resp.json();
    },

    async refresh() {
      const paths = [
        "/v1/cluster",
        "/v1/nodes",
        "/v1/health",
        "/v1/profiles",
        "/v1/load-balancers",
        "/v1/scale-sets",
        "/v1/databases",
        "/v1/drills",
        "/v1/apps",
      ];
      const got = await Promise.allSettled(paths.map((p) => this.get(p)));
      const failed = got.filter((g) => g.status === "rejected").map((g) => g.reason);
      if (failed.some((e) => e.status === 401)) {
        this.needToken = true;
      } else if (failed.length === 0) {
        this.needToken = false;
      }
      const other = failed.find((e) => e.status !== 401);
      this.error = other ? `The API answered: ${other.message}` : "";
      const [cluster, nodes, health, profiles, lbs, sets, dbs, drill, apps] = got.map((g) =>
        g.status === "fulfilled" ? g.value : null,
      );
      if (cluster) this.cluster = cluster;
      if (nodes) this.nodes = nodes.nodes;
      if (health) this.targets = health.targets;
      if (profiles) this.profiles = profiles.profiles;
      const unreachable = new Set();
      if (lbs) {
        this.loadBalancers = lbs.load_balancers;
        (lbs.unreachable || []).forEach((n) => unreachable.add(n));
      }
      if (sets) {
        this.scaleSets = sets.scale_sets;
        (sets.unreachable || []).forEach((n) => unreachable.add(n));
      }
      if (dbs) {
        this.databases = dbs.databases;
        (dbs.unreachable || []).forEach((n) => unreachable.add(n));
      }
      this.unreachable = [...unreachable];
      if (drill) this.drill = drill.drill;
      if (apps) this.apps = apps.apps;
      if (failed.length < paths.length) this.refreshed = this.clock(new Date().toISOString());
    },

    /// Refreshes once shortly after a burst of events.
    soon() {
      if (this.refreshSoon) return;
      this.refreshSoon = setTimeout(() => {
        this.refreshSoon = null;
        this.refresh();
      }, 200);
    },

    addEvent(e) {
      const key = JSON.stringify(e);
      if (this.seen.has(key)) return false;
      this.seen.add(key);
      this.events.push({ ...e, key });
      this.events.sort((a, b) => (a.at < b.at ? 1 : a.at > b.at ? -1 : 0));
      if (this.events.length > MAX_EVENTS) {
        for (const old of this.events.splice(MAX_EVENTS)) this.seen.delete(old.key);
      }
      return true;
    },

    restartStream() {
      if (this.stream) this.stream.abort();
    },

    /// Follows /v1/events/stream for as long as the page is open, reconnecting (with
    /// Last-Event-ID, so nothing the log holds is missed) whenever it ends.
    async follow() {
      for (;;) {
        const abort = new AbortController();
        this.stream = abort;
        try {
          const extra = { Accept: "text/event-stream" };
          if (this.lastEventId) extra["Last-Event-ID"] = this.lastEventId;
          const resp = await fetch("/v1/events/stream", {
            headers: this.headers(extra),
            signal: abort.signal,
            cache: "no-store",
          });
          if (resp.status === 401) this.needToken = true;
          if (!resp.ok) throw await errorOf(resp);
          this.live = true;
          // Subscribed: what came before is in /v1/events (events already shown are
          // dropped), which also covers a restarted node, whose ids start again.
          const backlog = await this.get("/v1/events");
          backlog.events.forEach((e) => this.addEvent(e));
          const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            let messages;
            [messages, buffer] = parseSse(buffer + value);
            for (const m of messages) {
              if (m.id) this.lastEventId = m.id;
              try {
                this.addEvent(JSON.parse(m.data));
              } catch (err) {
                console.warn("unreadable event", m.data, err);
              }
              this.soon();
            }
          }
        } catch (err) {
          if (err instanceof ApiError && err.status !== 401) {
            this.error = `The event stream: ${err.message}`;
          }
        }
        this.live = false;
        // Whatever ended this round, its connection is closed before the next one opens (a
        // leaked stream would hold one of the browser's few connections to the node).
        const restarted = abort.signal.aborted;
        abort.abort();
        if (!restarted) await sleep(RETRY_MS);
      }
    },

    async post(path, body) {
      this.busy = true;
      this.actionError = "";
      try {
        const resp = await fetch(path, {
          method: "POST",
          headers: this.headers({ "Content-Type": "application/json" }),
          body: body == null ? "" : JSON.stringify(body),
        });
        if (!resp.ok) throw await errorOf(resp);
        await resp.json();
      } catch (err) {
        this.actionError = err.message;
      } finally {
        this.busy = false;
        this.refresh();
      }
    },

    startDrill(site) {
      return this.post("/v1/drills/outage", { site, for: this.drillFor });
    },

    stopDrill() {
      return this.post("/v1/drills/stop", null);
    },

    // ---- what the page shows

    get sites() {
      const sites = (this.cluster && this.cluster.sites) || [];
      return sites;
    },

    where() {
      const c = this.cluster;
      if (!c) return "";
      const parts = [c.mode];
      if (c.node) parts.push(`node ${c.node}`);
      parts.push(c.site ? `site ${c.site}` : "every site");
      if (c.leader && c.leader.holder) parts.push(`leader ${c.leader.holder} (term ${c.leader.term})`);
      if (c.isolation && c.isolation.isolated) parts.push("ISOLATED");
      return parts.join(" · ");
    },

    nodesOf(site) {
      return this.nodes.filter((n) => n.site === site);
    },

    votes(target) {
      const t = this.targets.find((x) => x.target === target);
      return (t && t.votes) || [];
    },

    drillText() {
      const d = this.drill;
      if (!d) return "";
      const left = Math.max(0, Math.round((Date.parse(d.ends) - Date.now()) / 1000));
      return `OUTAGE DRILL of site ${d.site}: ${left} s left (until ${this.clock(d.ends)})`;
    },

    statusClass(status) {
      switch (status) {
        case "Online":
          return "ok";
        case "Degraded":
          return "bad";
        case "Disabled":
        case "Stopped":
          return "off";
        default:
          return "wait";
      }
    },

    ports(ports) {
      const list = Object.entries(ports || {}).map(([name, port]) => `${port} (${name})`);
      return list.length ? `:${list.join(", ")}` : "";
    },

    age(seconds) {
      if (seconds == null) return "";
      if (seconds < 120) return `${Math.round(seconds)}s`;
      if (seconds < 7200) return `${Math.round(seconds / 60)}m`;
      return `${Math.round(seconds / 3600)}h`;
    },

    lag(m) {
      if (m.role === "primary") return "";
      const parts = [];
      if (m.lag_bytes != null) parts.push(`${m.lag_bytes} B`);
      if (m.lag_seconds != null) parts.push(`${m.lag_seconds.toFixed(1)} s`);
      return parts.join(", ");
    },

    clock(at) {
      const t = new Date(at);
      if (Number.isNaN(t.getTime())) return at;
      const pad = (n, w) => String(n).padStart(w || 2, "0");
      return `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}.${pad(t.getMilliseconds(), 3)}`;
    },
  }));
});
