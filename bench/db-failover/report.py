"""bench/results/db-failover.md from the JSON lines of bench/db-failover/event.py."""

import argparse
import json
import statistics
import time

CASES = {
    "tandem-default": ("Tandem", '`replication = "sync"`, default `failover_timeout` (3 s)'),
    "tandem-2s": ("Tandem", '`replication = "sync"`, `failover_timeout = "2s"`'),
    "tandem-cluster": ("Tandem", 'cluster mode (a node per member, etcd), `replication = "sync"`, default `failover_timeout` (3 s)'),
    "tandem-cluster-2s": ("Tandem", 'cluster mode (a node per member, etcd), `replication = "sync"`, `failover_timeout = "2s"`'),
    "patroni-default": ("Patroni", "synchronous_mode, defaults: ttl 30, loop_wait 10, retry_timeout 10"),
    "patroni-tuned": ("Patroni", "synchronous_mode, tuned: ttl 20, loop_wait 1, retry_timeout 3"),
    "patroni-tuned-fastchecks": ("Patroni", "as tuned, HAProxy checks `inter 1s fall 1 rise 1` (not the documented 3s/3/2)"),
}
KINDS = {"kill": "`kill -9` primary postmaster", "switchover": "switchover",
         "node": "primary's node lost (`kill -9` of its agent and PostgreSQL)"}


def med(xs):
    return statistics.median(xs) if xs else None


def s(x):
    return "—" if x is None else f"{x / 1000:.2f}"


def n(x):
    return "—" if x is None else f"{x:g}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    for k in ["command", "runs", "seconds", "facts", "tandem", "postgres", "patroni", "etcd",
              "haproxy", "pgbench"]:
        p.add_argument("--" + k, default="")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    events = [r for r in rows if r["kind"] in KINDS]
    verify = {r["label"]: r for r in rows if r["kind"] == "verify"}
    labels = [c for c in CASES if any(r["label"] == c for r in rows)]

    stats = {}
    for c in labels:
        for k in KINDS:
            rs = [r for r in events if r["label"] == c and r["kind"] == k]
            if not rs:
                continue
            rto = [r["rto_ms"] for r in rs if r["rto_ms"] is not None]
            stats[c, k] = {
                "runs": len(rs),
                "failed": sum(1 for r in rs if r["rto_ms"] is None),
                "rto": rto,
                "we": [r["writer_errors"] for r in rs],
                "pe": [r["pgbench_errors"] for r in rs],
                "lost": sum(r["lost"] for r in rs),
                "acked": sum(r["acked"] for r in rs),
                "switch": [r["switchover_request_ms"] for r in rs if r.get("switchover_request_ms")],
                "rs": rs,
            }

    out = []
    w = out.append
    w("# Database failover: Tandem vs Patroni")
    w("")
    w("Two PostgreSQL members (edge and region) on loopback addresses of this machine, the same")
    w("PostgreSQL 15 binaries for both systems, synchronous replication. Per case, a fresh cluster,")
    w("then N repetitions of: `kill -9` of the primary's postmaster, wait until healthy")
    w("again (old primary back as synchronous standby), planned switchover to the other member;")
    w("for Tandem in cluster mode and for Patroni, then the primary's node lost: `kill -9` at once of the agent (Tandem's")
    w("node with its watchdog, or Patroni) and the postmaster, as when its machine dies, and the")
    w("agent started again afterwards.")
    w("During each event a writer inserts an increasing id every 20 ms over one connection")
    w("(reconnecting after any error, 2 s connect and 5 s query timeouts) and pgbench -c 4 runs a")
    w("one-row INSERT at 100 tx/s in all, both through the system's entry point:")
    w("")
    w("- **Tandem**, single process: the database frontend `127.0.170.20:5432` (Tandem's internal")
    w("  TCP load balancer for the edge site, whose pool is the current primary); the lease in its")
    w("  local store.")
    w("- **Tandem**, cluster mode: a node per member (`tandem up --node`, each with its own state")
    w("  directory), one etcd member, the lease in etcd; clients list both sites' frontends")
    w("  (`host=127.0.172.20,127.0.173.20`: libpq tries the next when one refuses, as the lost")
    w("  node's does).")
    w("- **Patroni**: HAProxy `127.0.180.20:5432` with Patroni's documented check (`option httpchk")
    w("  OPTIONS /primary`, `http-check expect status 200`, `default-server inter 3s fall 3 rise 2")
    w("  on-marked-down shutdown-sessions`, `check port 8008`), two Patroni agents, one etcd member")
    w("  (v3 API). PostgreSQL settings as Tandem's where Tandem sets them (wal_log_hints,")
    w("  hot_standby_feedback, wal_keep_size 256MB, wal_retrieve_retry_interval 500ms), data")
    w("  checksums, pg_rewind and slots on; wal_sender/receiver_timeout 5s (Tandem sets both to")
    w("  its `failover_timeout`).")
    w("")
    w("**RTO** = fault (the SIGKILL, or the switchover HTTP request being sent) → the first write")
    w("acknowledged by another postmaster than the one that acknowledged the last write before the")
    w("fault (server address + `pg_postmaster_start_time()`, so a primary restarted in place counts).")
    w("**Writer errors**: failed connects/INSERTs of the writer after the fault (one try per 20 ms,")
    w("so this is mostly the outage length over 20 ms). **pgbench errors**: pgbench clients that")
    w("aborted or could not connect after the fault (pgbench 15 ends a client on a lost connection;")
    w("it is restarted 200 ms after it ends). **Lost**: acknowledged ids missing when looked up")
    w("through the entry point after each event, and again for the whole case at its end.")
    w("")
    w(f"- machine: {a.facts}; {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}")
    w(f"- {a.tandem}; {a.postgres}; {a.patroni}; {a.etcd}; {a.haproxy}; {a.pgbench}")
    w(f"- command: `{a.command}` (as run here: `flock /tmp/tandem-cargo.lock {a.command}`);"
      f" the whole run took {int(a.seconds) // 60} min {int(a.seconds) % 60} s")
    w("")
    w("| system | settings | event | runs | RTO median s | RTO max s | writer errors median / max | pgbench errors median / max | acked writes lost |")
    w("|---|---|---|---|---|---|---|---|---|")
    for c in labels:
        for k in KINDS:
            st = stats.get((c, k))
            if not st:
                continue
            sysname, settings = CASES[c]
            runs = str(st["runs"]) + (f" ({st['failed']} without recovery in 180 s)" if st["failed"] else "")
            w(f"| {sysname} | {settings} | {KINDS[k]} | {runs} | {s(med(st['rto']))} | "
              f"{s(max(st['rto']) if st['rto'] else None)} | {n(med(st['we']))} / {n(max(st['we']))} | "
              f"{n(med(st['pe']))} / {n(max(st['pe']))} | {st['lost']} of {st['acked']} |")
    w("")
    w("Whole-case check (every id acknowledged in the case, looked up at its end): " + "; ".join(
        f"{c}: {v['lost']} of {v['acked']} lost" for c, v in verify.items()) + ".")
    w("")
    pairs = [("tandem-default", "patroni-default"), ("tandem-2s", "patroni-tuned"),
             ("tandem-2s", "patroni-tuned-fastchecks"), ("tandem-default", "patroni-tuned"),
             ("tandem-cluster", "patroni-default"), ("tandem-cluster", "patroni-tuned"),
             ("tandem-cluster-2s", "patroni-tuned"), ("tandem-cluster-2s", "patroni-tuned-fastchecks")]
    ratio_lines = []
    for t, pt in pairs:
        for k in KINDS:
            a1, b1 = stats.get((t, k)), stats.get((pt, k))
            if a1 and b1 and a1["rto"] and b1["rto"]:
                ratio_lines.append(
                    f"- {KINDS[k]}, {t} / {pt}: RTO median {med(a1['rto']) / med(b1['rto']):.2f}×, "
                    f"max {max(a1['rto']) / max(b1['rto']):.2f}×")
    if ratio_lines:
        w("Ratios (Tandem / Patroni; below 1 means Tandem recovers sooner):")
        w("")
        out.extend(ratio_lines)
        w("")
    w("Raw RTOs, s (writer errors, pgbench errors; switchover request duration):")
    w("")
    for c in labels:
        for k in KINDS:
            st = stats.get((c, k))
            if not st:
                continue
            parts = []
            for r in st["rs"]:
                x = s(r["rto_ms"]) + f" ({r['writer_errors']}, {r['pgbench_errors']}"
                if r.get("switchover_request_ms") is not None:
                    x += f"; {r['switchover_request_ms'] / 1000:.2f} s HTTP {r['switchover_http']}"
                parts.append(x + ")")
            w(f"- {c}, {k}: " + ", ".join(parts))
    print("\n".join(out))


if __name__ == "__main__":
    main()
