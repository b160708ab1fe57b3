#!/usr/bin/env python3
"""Load on the password step of the sign-in (`POST /_portcullis/login`), for a bounded time.

  signin_load.py GW --seconds S --clients C [--rate R] [--sources NETS HOSTS] [--users FILE]
                    [--target EMAIL --target-share F] [--password P] [--pid PID]

Each of C clients keeps one HTTP/1.1 connection and posts the sign-in form (one CSRF cookie and
token fetched at the start, as a scripted client would). With --sources the clients bind their
connections to loopback addresses 127.10.n.h (n < NETS, 1 ≤ h ≤ HOSTS: NETS different /24
networks), a new address every 20 attempts, so the gateway sees many source addresses. --rate
caps the attempts per second over all clients (default: as fast as answers come). Usernames come
from --users (one per line) or are made up; --target puts a real account in the list with the
given share of attempts. --pid: report the CPU seconds that process used during the run.
Prints one JSON object: attempts, attempts/s, answers by status, latency percentiles.
"""
import argparse
import asyncio
import json
import random
import re
import time
import urllib.parse


def cpu_seconds(pid):
    if not pid:
        return 0.0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    import os
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http(reader, writer, raw):
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"][0]))
    elif headers.get("transfer-encoding", [""])[0] == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        body = b""
    return status, headers, body


async def csrf(host, port):
    reader, writer = await asyncio.open_connection(host, port)
    status, headers, body = await http(reader, writer, f"GET /_portcullis/login HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    writer.close()
    cookie = next(c.split(";", 1)[0] for c in headers["set-cookie"] if "csrf" in c.split("=", 1)[0])
    token = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
    return cookie, token


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gw")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--sources", type=int, nargs=2, metavar=("NETS", "HOSTS"))
    ap.add_argument("--users", type=int, default=5000, help="made-up usernames")
    ap.add_argument("--user", help="always this username")
    ap.add_argument("--target")
    ap.add_argument("--target-share", type=float, default=0.0)
    ap.add_argument("--password")
    ap.add_argument("--pid", type=int)
    a = ap.parse_args()
    host, port = a.gw.rsplit(":", 1)
    port = int(port)
    cookie, token = await csrf(host, port)
    names = [a.user] if a.user else [f"customer{i}@example.net" for i in range(a.users)]
    sources = None
    if a.sources:
        sources = [f"127.10.{n}.{h}" for n in range(a.sources[0]) for h in range(1, a.sources[1] + 1)]
        random.shuffle(sources)
    counts, latencies, errors = {}, [], [0]
    deadline = time.monotonic() + a.seconds
    interval = a.clients / a.rate if a.rate else 0
    next_source = [0]

    def request():
        user = a.target if a.target and random.random() < a.target_share else random.choice(names)
        pw = a.password or f"Summer{random.randint(1000, 9999)}!"
        body = urllib.parse.urlencode({"username": user, "password": pw, "csrf": token, "next": ""}).encode()
        return (f"POST /_portcullis/login HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n"
                f"Accept: application/json\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def client(i):
        due = time.monotonic() + random.random() * interval
        while time.monotonic() < deadline:
            local = None
            if sources:
                local = (sources[next_source[0] % len(sources)], 0)
                next_source[0] += 1
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            except OSError:
                errors[0] += 1
                await asyncio.sleep(0.05)
                continue
            try:
                for _ in range(20 if sources else 1_000_000):
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    if interval:
                        if due > now:
                            await asyncio.sleep(due - now)
                        due = max(due + interval, time.monotonic() - interval)
                    t0 = time.monotonic()
                    status, headers, _ = await asyncio.wait_for(http(reader, writer, request()), 30)
                    latencies.append(time.monotonic() - t0)
                    counts[status] = counts.get(status, 0) + 1
                    if headers.get("connection", [""])[0].lower() == "close":
                        break
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors[0] += 1
            finally:
                writer.close()

    cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
    await asyncio.gather(*(client(i) for i in range(a.clients)))
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(a.pid) - cpu0
    latencies.sort()
    total = sum(counts.values())
    pct = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else None
    out = {"attempts": total, "seconds": round(elapsed, 1), "attempts_per_s": round(total / elapsed, 1),
           "by_status": {str(k): v for k, v in sorted(counts.items())}, "connection_errors": errors[0],
           "p50_ms": pct(0.5), "p99_ms": pct(0.99), "sources": len(sources) if sources else 1}
    if a.pid:
        out["gateway_cpu_seconds"] = round(cpu, 2)
        ok = sum(v for k, v in counts.items() if k in (200, 303))
        if ok:
            out["gateway_cpu_seconds_per_accepted_attempt"] = round(cpu / ok, 4)
    print(json.dumps(out))


asyncio.run(main())
