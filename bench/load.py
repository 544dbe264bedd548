"""Load test of the HTTP service on loopback: many clients, uploads and searches by id.

Starts the service (search.service.run, the real uvicorn) in a subprocess on a
free loopback port over an indexed database, waits for it, then runs each
phase: ``--clients`` threads share ``--requests`` requests, about half of them
uploads of real images and half searches by a random indexed image's id, all
with the phase's options. Prints throughput, latency per kind and errors, and
how much CPU other processes took meanwhile (this is a shared machine).

    python bench/load.py --db /tmp/copies.db --images ../shared/datasets --requests 1000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each phase: a name and the options of every request in it.
PHASES = {"default": {}, "verify=0": {"verify": 0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default="/tmp/copies.db")
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "datasets"),
                    help="folder whose images (any depth) are uploaded")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=1000, help="per phase")
    ap.add_argument("--uploads", type=float, default=0.5, help="share of uploads")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--threads", type=int, default=None, help="the server's search threads")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    files = sorted(p for p in Path(args.images).rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())
    uploads = [(p.name, p.read_bytes()) for p in rng.sample(files, min(200, len(files)))]
    ids = indexed_ids(args.db)
    print(f"{len(ids)} indexed images; uploading {len(uploads)} of {len(files)} files "
          f"(median {np.median([len(d) for _, d in uploads]) / 1024:.0f} KB)", flush=True)
    with Server(args.db, args.threads) as server:
        report = {"machine": machine(), "clients": args.clients, "server_threads": server.threads,
                  "phases": {}}
        for name in args.phases.split(","):
            jobs = [("upload", rng.choice(uploads)) if rng.random() < args.uploads
                    else ("id", rng.choice(ids)) for _ in range(args.requests)]
            result = run_phase(server.url, jobs, PHASES[name], args.clients, server.pid)
            report["phases"][name] = {"options": PHASES[name] or "defaults (k 10, qe 2, verify 100)",
                                      **result}
            print_phase(name, report["phases"][name])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def indexed_ids(db: str) -> list[int]:
    from indexer.store import Store

    store = Store(db, create=False)
    try:
        return [int(i) for i in store.ok_ids()]
    finally:
        store.close()


class Server:
    """search.service.run in a subprocess on a free loopback port."""

    def __init__(self, db: str, threads: int | None):
        from search.service import DEFAULT_THREADS

        self.db, self.threads = db, threads or DEFAULT_THREADS

    def __enter__(self) -> "Server":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code = ("import sys; from search.service import run; "
                "run(sys.argv[1], port=int(sys.argv[2]), threads=int(sys.argv[3]), log_level='warning')")
        self.proc = subprocess.Popen([sys.executable, "-c", code, self.db, str(port), str(self.threads)],
                                     cwd=ROOT)
        self.pid, self.url = self.proc.pid, f"http://127.0.0.1:{port}"
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with status {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/api/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        print(f"server up in {time.monotonic() - started:.1f} s at {self.url}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_phase(url: str, jobs: list, options: dict, clients: int, server_pid: int) -> dict:
    """Run ``jobs`` from ``clients`` threads; latencies per kind, errors, throughput."""
    warm(url, jobs[:4], options)
    done: list[tuple[str, int, float, str]] = []
    lock, queue = threading.Lock(), iter(jobs)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    job = next(queue, None)
                if job is None:
                    return
                t = time.perf_counter()
                status, why = ask(http, job, options)
                with lock:
                    done.append((job[0], status, time.perf_counter() - t, why))

    before = cpu(server_pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = cpu(server_pid)
    errors = [(kind, status, why) for kind, status, _, why in done if status != 200 or why]
    out = {"requests": len(done), "wall_s": round(wall, 1), "per_s": round(len(done) / wall, 2),
           "errors": len(errors), "first_errors": errors[:5],
           "server_cpu_s": round(after[1] - before[1], 1), "clients_cpu_s": round(after[2] - before[2], 1),
           "other_cpu_s": round((after[0] - before[0]) - (after[1] - before[1]) - (after[2] - before[2]), 1),
           "cores": os.cpu_count()}
    for kind in ("upload", "id"):
        lat = np.array([s for k, _, s, _ in done if k == kind]) * 1000
        if len(lat):
            out[kind] = {"n": len(lat), "p50_ms": round(float(np.percentile(lat, 50))),
                         "p95_ms": round(float(np.percentile(lat, 95))), "max_ms": round(float(lat.max()))}
    return out


def warm(url: str, jobs: list, options: dict) -> None:
    """A few requests first, uncounted: the first ones load what the server loads lazily."""
    with httpx.Client(base_url=url, timeout=300) as http:
        for job in jobs:
            ask(http, job, options)


def ask(http: httpx.Client, job, options: dict) -> tuple[int, str]:
    """(status, what is wrong with the answer or '')."""
    kind, what = job
    try:
        if kind == "upload":
            name, data = what
            r = http.post("/api/search", params=options, files={"file": (name, data)})
        else:
            r = http.get(f"/api/images/{what}/similar", params=options)
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return r.status_code, r.text[:200]
    return 200, "" if r.json().get("results") else "no results"


def cpu(pid: int) -> tuple[float, float, float]:
    """Busy CPU seconds of (the machine, the server process, this process)."""
    tick = os.sysconf("SC_CLK_TCK")
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    machine = (sum(f[:8]) - f[3] - f[4]) / tick
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    server = (int(fields[11]) + int(fields[12])) / tick
    t = os.times()
    return machine, server, t.user + t.system


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{os.cpu_count()} cores, {model}, {mem:.0f} GiB"


def print_phase(name: str, r: dict) -> None:
    kinds = "; ".join(f"{k}: n {r[k]['n']}, p50 {r[k]['p50_ms']} ms, p95 {r[k]['p95_ms']} ms, "
                      f"max {r[k]['max_ms']} ms" for k in ("upload", "id") if k in r)
    print(f"{name}: {r['requests']} requests in {r['wall_s']} s = {r['per_s']}/s, {r['errors']} errors; "
          f"{kinds}; CPU s: server {r['server_cpu_s']}, clients {r['clients_cpu_s']}, "
          f"other processes {r['other_cpu_s']} (of {r['cores'] * r['wall_s']:.0f} available)", flush=True)
    for e in r["first_errors"]:
        print("  error:", e, flush=True)


if __name__ == "__main__":
    main()
