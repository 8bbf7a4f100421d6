"""One measured event against a PostgreSQL HA system, through its client entry point.

The same code measures Tandem and Patroni (run by bench/db-failover/run with the venv's Python,
psycopg 3):

  event.py setup  --dsn DSN
      creates the writer's table `acked` and pgbench's table `load` (through the entry point).
  event.py event  --dsn DSN --kind kill --pid PID ...
  event.py event  --dsn DSN --kind node --pid PID --pid PID ...   (a machine lost: all at once)
  event.py event  --dsn DSN --kind switchover --url URL --body JSON ...
      a writer inserts an increasing id every 20 ms (one connection, reconnecting after any
      error) and pgbench -c 4 runs a one-row INSERT at 100 tx/s in all (restarted 200 ms after it
      ends, as every one of its clients aborts on a lost connection); once both are steady the
      fault is made: SIGKILL of the primary's postmaster, or the switchover request (an HTTP
      POST that returns when the system says it is done). RTO = fault -> the first write
      acknowledged by another postmaster than the one that acknowledged the last write before
      the fault (server address + pg_postmaster_start_time(): a commit in flight at the kill
      may still be acknowledged by the dying primary's backend, and a primary restarted in place
      is another postmaster). One second after that write the load stops; every acknowledged
      id is then looked up through the entry point. Prints one JSON line.
  event.py verify --dsn DSN --acked FILE
      every id in FILE (all the acknowledged ids of a case) is in the table now.
"""

import argparse
import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import psycopg

TICK = 0.020  # the writer's period
CONNECT_TIMEOUT = 2.0
QUERY_TIMEOUT = 5.0
RECOVERY_DEADLINE = 180.0
STEADY_DEADLINE = 60.0
AFTER = 1.0  # load kept running after the recovery


def now():
    return time.monotonic()


class State:
    def __init__(self):
        self.stop = False
        self.acks = []  # (id, sent, acked, server)
        self.errors = []  # (when, text)
        self.pgbench_errors = []  # (when, text)
        self.pgbench_started = None


async def writer(dsn, st):
    next_id = time.time_ns() // 1000  # ids never repeat across events: start from the clock
    conn = None
    due = now()
    while not st.stop:
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        due = max(due + TICK, now())
        try:
            if conn is None:
                conn = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=2),
                    CONNECT_TIMEOUT,
                )
            i = next_id
            next_id += 1  # an id whose INSERT got no answer may or may not be there; never reused
            sent = now()
            cur = await asyncio.wait_for(
                conn.execute(
                    "INSERT INTO acked (id) VALUES (%s) RETURNING "
                    "inet_server_addr()::text || ':' || inet_server_port() || ' ' || "
                    "pg_postmaster_start_time()::text",
                    (i,),
                ),
                QUERY_TIMEOUT,
            )
            row = await cur.fetchone()
            st.acks.append((i, sent, now(), row[0]))
        except (psycopg.Error, OSError, asyncio.TimeoutError) as e:
            st.errors.append((now(), (str(e).strip().splitlines() or [type(e).__name__])[0]))
            if conn is not None:
                try:
                    await asyncio.wait_for(conn.close(), 1)
                except Exception:
                    pass
            conn = None
    if conn is not None:
        try:
            await asyncio.wait_for(conn.close(), 1)
        except Exception:
            pass


def pg_env(dsn):
    """libpq environment for pgbench from a 'key=value ...' DSN."""
    env = dict(os.environ)
    keys = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
            "dbname": "PGDATABASE"}
    for part in dsn.split():
        k, _, v = part.partition("=")
        if k in keys:
            env[keys[k]] = v
    env["PGCONNECT_TIMEOUT"] = "2"
    return env


async def pgbench(dsn, script, st):
    env = pg_env(dsn)
    while not st.stop:
        p = await asyncio.create_subprocess_exec(
            "pgbench", "-n", "-c", "4", "-j", "1", "-T", "3600", "-R", "100", "-f", script,
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        if st.pgbench_started is None:
            st.pgbench_started = now()

        async def read():
            while True:
                line = await p.stderr.readline()
                if not line:
                    return
                text = line.decode(errors="replace").strip()
                # A client that aborted (its connection broke) or could not connect: one error
                # each; the lines that only explain them are not counted.
                if " aborted " in text or "could not create connection" in text:
                    st.pgbench_errors.append((now(), text))

        reader = asyncio.create_task(read())
        while p.returncode is None and not st.stop:
            try:
                await asyncio.wait_for(p.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        if p.returncode is None:
            p.terminate()
            try:
                await asyncio.wait_for(p.wait(), 5)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()
        await asyncio.wait_for(reader, 5)
        if not st.stop:
            await asyncio.sleep(0.2)


def post(url, body):
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = now()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(errors="replace")[:300], now() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300], now() - t0
    except OSError as e:  # no answer at all
        return 0, str(e)[:300], now() - t0


async def lookup(dsn, ids, deadline=30.0):
    """The ids of `ids` present in the table, through the entry point (retried until it answers)."""
    end = now() + deadline
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=2) as c:
                cur = await c.execute("SELECT id FROM acked WHERE id = ANY(%s)", (list(ids),))
                return {r[0] for r in await cur.fetchall()}
        except psycopg.Error:
            if now() > end:
                raise
            await asyncio.sleep(0.2)


async def event(a):
    st = State()
    tasks = [asyncio.create_task(writer(a.dsn, st)),
             asyncio.create_task(pgbench(a.dsn, a.script, st))]
    out = {"label": a.label, "kind": a.kind}
    try:
        # Steady: 50 writes acknowledged and pgbench running for a second without error.
        end = now() + STEADY_DEADLINE
        while not (len(st.acks) >= 50 and st.pgbench_started
                   and now() - st.pgbench_started > 1.0):
            if now() > end:
                raise SystemExit(f"not steady within {STEADY_DEADLINE:.0f} s: "
                                 f"{len(st.acks)} writes, errors {st.errors[-3:]}")
            await asyncio.sleep(0.02)
        out["errors_before"] = len(st.errors) + len(st.pgbench_errors)
        before = st.acks[-1][3]
        n_before = len(st.acks)
        switch = None
        fault = now()
        if a.kind in ("kill", "node"):
            for pid in a.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            switch = asyncio.create_task(asyncio.to_thread(post, a.url, a.body))
        end = fault + RECOVERY_DEADLINE
        first = None
        while first is None and now() < end:
            await asyncio.sleep(0.005)
            first = next((x for x in st.acks[n_before:] if x[3] != before and x[2] > fault), None)
        if first is not None:
            out["rto_ms"] = round((first[2] - fault) * 1000, 1)
            await asyncio.sleep(AFTER)
        else:
            out["rto_ms"] = None
        if switch is not None:
            code, text, took = await asyncio.wait_for(switch, 130)
            out["switchover_http"] = code
            out["switchover_request_ms"] = round(took * 1000, 1)
            if code >= 300:
                out["switchover_answer"] = text
        st.stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        after = [x for x in st.acks if x[2] > fault]
        out["first_ack_after_fault_ms"] = round((after[0][2] - fault) * 1000, 1) if after else None
        out["old_server"] = before
        out["new_server"] = first[3] if first else None
        out["writer_errors"] = sum(1 for t, _ in st.errors if t > fault)
        out["pgbench_errors"] = sum(1 for t, _ in st.pgbench_errors if t > fault)
        out["writer_error_sample"] = sorted({e for t, e in st.errors if t > fault})[:3]
        out["pgbench_error_sample"] = sorted({e for t, e in st.pgbench_errors if t > fault})[:3]
        out["acked"] = len(st.acks)
        ids = [x[0] for x in st.acks]
        present = await lookup(a.dsn, ids)
        lost = [i for i in ids if i not in present]
        out["lost"] = len(lost)
        if lost:
            out["lost_ids"] = lost[:20]
        with open(a.acked, "a") as f:
            f.write("".join(f"{i}\n" for i in ids))
    finally:
        st.stop = True
        for t in tasks:
            if not t.done():
                try:
                    await asyncio.wait_for(t, 10)
                except Exception:
                    t.cancel()
    print(json.dumps(out), flush=True)


async def setup(a):
    end = now() + 60
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(a.dsn, autocommit=True,
                                                             connect_timeout=2) as c:
                await c.execute("CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY)")
                await c.execute("CREATE TABLE IF NOT EXISTS load "
                                "(id bigserial PRIMARY KEY, client int, at timestamptz DEFAULT now())")
                return
        except psycopg.Error as e:
            if now() > end:
                raise SystemExit(f"setup: {e}")
            await asyncio.sleep(0.5)


async def verify(a):
    with open(a.acked) as f:
        ids = [int(x) for x in f if x.strip()]
    present = await lookup(a.dsn, ids)
    lost = [i for i in ids if i not in present]
    print(json.dumps({"label": a.label, "kind": "verify", "acked": len(ids), "lost": len(lost),
                      "lost_ids": lost[:20]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["setup", "event", "verify"])
    p.add_argument("--dsn", required=True)
    p.add_argument("--label", default="")
    p.add_argument("--kind", choices=["kill", "node", "switchover"])
    p.add_argument("--pid", type=int, action="append", default=[])
    p.add_argument("--url")
    p.add_argument("--body")
    p.add_argument("--acked")
    p.add_argument("--script")
    a = p.parse_args()
    asyncio.run({"setup": setup, "event": event, "verify": verify}[a.mode](a))


if __name__ == "__main__":
    main()
