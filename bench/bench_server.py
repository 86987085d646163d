"""The job server under dashboard-like load: 50 clients polling job events and the job list while a job trains.

Starts `tunesmith serve` on a free loopback port with its own data folder, registers a tiny seeded
model (tunesmith.testing, 2 layers, hidden 32: the training job is real but cheap, so the figures are
the server's, not the GPU's), uploads a small dataset, starts a job long enough to train for the whole
measurement, then runs N client threads for D seconds. Each client keeps one HTTP/1.1 keep-alive
connection and loops: GET /v1/fine_tuning/jobs/{id}/events?limit=20, GET /v1/fine_tuning/jobs?limit=20,
then sleeps --interval seconds (0: poll back to back, a saturation test). Reports the request rate and
latency percentiles over all requests, checks every answer was 200, and that the job trained meanwhile.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_server.py                     # 50 clients, 60 s, 0.5 s interval
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_server.py --interval 0 --duration 20
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_server.py --postgres              # 2 API servers, 1 PostgreSQL, 200

--postgres: a throwaway PostgreSQL cluster (initdb/pg_ctl in a temporary folder on a free port), two API servers on
it sharing one data folder (the first trains the job, the second serves only), and the clients (200 by default)
split between the two servers.

The issue's bar: p99 latency under 100 ms (printed as PASS/FAIL). Clients and server share this
machine's cores, and the training job runs beside them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGET_P99_MS = 100.0
RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-token-" + "x" * 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, help="polling clients (default 50; 200 with --postgres)")
    p.add_argument("--postgres", action="store_true", help="two API servers on one PostgreSQL store")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--interval", type=float, default=0.5, help="seconds each client waits between polls")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.clients = args.clients or (200 if args.postgres else 50)

    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-server-") as tmp:
        tmp = Path(tmp)
        servers, cluster = [], None
        try:
            if args.postgres:
                cluster = PgCluster()
                url = cluster.start()
                servers = [start_server(tmp, store=url, workers=1), start_server(tmp, store=url, workers=0)]
            else:
                servers = [start_server(tmp)]
            ports = [port for _, port in servers]
            job_id = start_job(ports[0], tmp)
            steps_before = trained_steps(ports[0], job_id)
            result = load(ports, job_id, args.clients, args.duration, args.interval)
            result["job_steps_during_load"] = trained_steps(ports[0], job_id) - steps_before
            request(ports[0], "POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")
        finally:
            for server, _ in servers:
                server.send_signal(signal.SIGTERM)
            for server, _ in servers:
                server.wait(60)
            if cluster is not None:
                cluster.stop()
    result.update(clients=args.clients, duration_s=args.duration, interval_s=args.interval,
                  store="postgresql, 2 API servers" if args.postgres else "sqlite, 1 API server",
                  model="tiny seeded Llama (2 layers, hidden 32), LoRA", cpu_count=os.cpu_count(),
                  load_average_at_end=os.getloadavg()[0], meets_target=result["p99_ms"] < TARGET_P99_MS)
    RESULTS.mkdir(exist_ok=True)
    name = "server_postgres.json" if args.postgres else "server.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"job server ({result['store']}): {args.clients} clients x {args.duration:.0f} s, poll interval "
          f"{args.interval} s, while a job trains")
    print(f"  requests            : {result['requests']} ({result['errors']} not 200), {result['rate_per_s']:.0f} req/s")
    print(f"  latency p50/p90/p99 : {result['p50_ms']:.1f} / {result['p90_ms']:.1f} / {result['p99_ms']:.1f} ms "
          f"(max {result['max_ms']:.0f} ms)")
    print(f"  by route p99        : events {result['events_p99_ms']:.1f} ms, job list {result['list_p99_ms']:.1f} ms")
    print(f"  job steps meanwhile : {result['job_steps_during_load']}")
    print(f"  target p99 < {TARGET_P99_MS:.0f} ms : {'PASS' if result['meets_target'] else 'FAIL'}   "
          f"(load average {result['load_average_at_end']:.1f} on {result['cpu_count']} cores; "
          f"written to {RESULTS / name})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster: initdb and pg_ctl (Debian's postgresql) in a temporary folder on a free port,
    trust auth on 127.0.0.1 only; as root, run by the postgres user (initdb refuses root)."""

    def __init__(self):
        import glob
        import shutil

        def tool(name):
            found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
            return found if isinstance(found, str) else (found[-1] if found else None)

        self.initdb, self.pg_ctl = tool("initdb"), tool("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise SystemExit("--postgres needs PostgreSQL's initdb and pg_ctl (make setup installs Debian's postgresql)")
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.base = Path(tempfile.mkdtemp(prefix="tunesmith-bench-pg-"))
        if self.as_user:
            shutil.chown(self.base, "postgres")

    def start(self) -> str:
        port, cluster = free_port(), self.base / "cluster"
        subprocess.run(self.as_user + [self.initdb, "-D", str(cluster), "-U", "tunesmith", "--auth=trust", "-E", "UTF8",
                                       "--no-sync"], check=True, capture_output=True)
        opts = f"-p {port} -k {self.base} -c listen_addresses=127.0.0.1 -c max_connections=300"
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(cluster), "-o", opts, "-l", str(self.base / "log"), "-w",
                                       "start"], check=True, capture_output=True)
        return f"postgresql://tunesmith@127.0.0.1:{port}/postgres"

    def stop(self) -> None:
        import shutil

        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.base / "cluster"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def start_server(tmp: Path, store: str | None = None, workers: int = 1) -> tuple[subprocess.Popen, int]:
    from tunesmith.testing import save_tiny_model

    model = tmp / "tiny"
    if not model.exists():
        save_tiny_model(model)
    (tmp / "tokens").write_text(TOKEN + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "--port", str(port), "--data-dir", str(tmp / "data"),
           "--token-file", str(tmp / "tokens"), "--model", f"tiny={model}", "--worker-threads", "1",
           "--workers", str(workers), "--set", "data.max_length=64", "--set", "eval.compare_base=false"]
    cmd += ["--store", store] if store else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / f"server-{port}.log", "wb"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/v1/models")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the server did not start: {(tmp / f'server-{port}.log').read_text()[-2000:]}")


def start_job(port: int, tmp: Path) -> str:
    """Upload 64 examples and start a job that trains far longer than the measurement (cancelled after)."""
    rng = random.Random(0)
    words = ["fox", "dog", "paris", "france", "date", "iso", "hello", "world", "quick", "brown", "lazy", "capital"]
    lines = []
    for _ in range(64):
        w = rng.sample(words, 3)
        lines.append(json.dumps({"messages": [{"role": "user", "content": " ".join(w)},
                                              {"role": "assistant", "content": " ".join(reversed(w))}]}))
    file_id = upload(port, "train.jsonl", ("\n".join(lines) + "\n").encode())
    status, body = request(port, "POST", "/v1/fine_tuning/jobs", {
        "model": "tiny", "training_file": file_id, "hyperparameters": {"batch_size": 4},
        "tunesmith_config": {"train.max_steps": 1000000, "eval.every_steps": 50, "checkpoint.every_steps": 50}})
    assert status == 200, body
    job_id = json.loads(body)["id"]
    deadline = time.monotonic() + 180
    while trained_steps(port, job_id) < 1:
        if time.monotonic() > deadline:
            raise SystemExit("the job did not start training")
        time.sleep(0.5)
    return job_id


def trained_steps(port: int, job_id: str) -> int:
    _, body = request(port, "GET", f"/v1/fine_tuning/jobs/{job_id}/metrics")
    return max((p["step"] for p in json.loads(body)["data"] if "train_loss" in p), default=0)


def upload(port: int, name: str, content: bytes) -> str:
    boundary = "tunesmithbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/files", body, {"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, data
    return json.loads(data)["id"]


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    payload = None
    if body is not None:
        payload, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    conn.request(method, path, payload, headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def load(ports: list[int], job_id: str, clients: int, duration: float, interval: float) -> dict:
    """Client i polls server ports[i % len(ports)]."""
    routes = {"events": f"/v1/fine_tuning/jobs/{job_id}/events?limit=20", "list": "/v1/fine_tuning/jobs?limit=20"}
    samples: dict[str, list[float]] = {k: [] for k in routes}
    errors = [0]
    lock = threading.Lock()
    start = threading.Event()
    t_end = [0.0]

    def client(seed: int) -> None:
        port = ports[seed % len(ports)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        mine = {k: [] for k in routes}
        bad = 0
        start.wait()
        time.sleep(random.Random(seed).uniform(0, max(interval, 0.05)))  # clients do not poll in lockstep
        while time.monotonic() < t_end[0]:
            for name, path in routes.items():
                t0 = time.perf_counter()
                try:
                    conn.request("GET", path, headers=headers)
                    r = conn.getresponse()
                    r.read()
                    ok = r.status == 200
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    ok = False
                mine[name].append((time.perf_counter() - t0) * 1000)
                bad += not ok
            if interval:
                time.sleep(interval)
        with lock:
            for k in routes:
                samples[k] += mine[k]
            errors[0] += bad

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    t_end[0] = t0 + duration
    start.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    every = sorted(samples["events"] + samples["list"])
    return {"requests": len(every), "errors": errors[0], "rate_per_s": len(every) / elapsed,
            "p50_ms": pct(every, 50), "p90_ms": pct(every, 90), "p99_ms": pct(every, 99), "max_ms": every[-1],
            "mean_ms": statistics.fmean(every), "events_p99_ms": pct(sorted(samples["events"]), 99),
            "list_p99_ms": pct(sorted(samples["list"]), 99)}


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


if __name__ == "__main__":
    main()
