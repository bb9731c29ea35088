"""Load test of `mmfuse serve` with Locust: throughput, latency percentiles, errors, memory over a long run.

    python benchmarks/bench_serve.py RUN_DIR [--rounds 2] [--soak 10000] [--quick] [--out FILE]

Two servers of the run are started on 127.0.0.1 (ephemeral ports) by `mmfuse serve`: "dynamic" (dynamic
batching, `--max-batch 32 --max-wait-ms 5`, the defaults) and "off" (`--max-batch 1`: every request is its
own forward pass). Locust (headless, started from this script, `FastHttpUser`, no think time: each client
sends its next request when the last one is answered) drives them with easy-VQA test questions about their
images (each request one record: the PNG base64-encoded + the question) at 1, 4, 16 and 64 concurrent
clients. Sides are interleaved in rounds (the order rotating), so a burst of load on this shared machine hits
both alike. Every load run is bounded in requests and in seconds and stops by itself; no traffic leaves the
loopback address.

Reported per configuration and client count: requests/s, p50/p95/p99 latency, errors, the mean batch size the
server formed, and the server's CPU seconds per request. Then:

- batch-1 latency: the "off" server's median latency at 1 client vs the bare model forward on one pre-collated
  record (measured in a separate process between the load runs, on a worker thread as the server runs it) plus
  the HTTP overhead (the median latency of `POST /noop`, which reads and parses the same bodies on the same
  server and runs no model). Target <= 1.2x.
- dynamic batching: requests/s at 16 clients, "dynamic" vs "off". Target >= 3x.
- soak: `--soak` requests (10,000) at 16 clients to the "dynamic" server with its RSS sampled every 0.5 s.
  Target: zero errors, RSS flat (end within 5% of the value after the first 1,000 requests).

Needs the serve extra and Locust: pip install -e ".[serve]" locust
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
USERS = (1, 4, 16, 64)
QUESTION_POOL = 256


# ------------------------------------------------------------------------------------------ payloads
def write_payloads(path: Path, n: int) -> None:
    """n easy-VQA test (image, question) pairs, spread over the test set: paths and request bodies."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    step = max(1, len(questions) // n)
    rows = []
    for i in range(0, step * n, step):
        image = paths[image_ids[i]]
        body = {"image": base64.b64encode(Path(image).read_bytes()).decode(), "text": questions[i]}
        rows.append({"image_path": image, "text": questions[i], "body": json.dumps(body)})
    path.write_text(json.dumps(rows))


# ------------------------------------------------------------------------------------------ servers
class ServerProcess:
    """`mmfuse serve RUN --port 0 ...` in a child process; `url` once it answers /health."""

    def __init__(self, run: str, name: str, flags: list[str]) -> None:
        self.name, self.flags = name, flags
        cmd = [sys.executable, "-m", "mmfuse.cli", "serve", run, "--host", "127.0.0.1", "--port", "0", *flags]
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if " at http://" not in line:
            self.stop()
            raise RuntimeError(f"{name} server did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.url = line.split(" at ")[1].split("/ ")[0]
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain
        get_json(self.url + "/health")

    def stats(self) -> dict[str, Any]:
        return get_json(self.url + "/stats")

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


# ------------------------------------------------------------------------------------------ load runs
def locust_run(url: str, path: str, users: int, requests: int, seconds: float, payloads: Path) -> dict[str, Any]:
    """One bounded Locust run in its own process (gevent patches the process it runs in)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_locust", url, path, str(users), str(requests)]
    cmd += [str(seconds), str(payloads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    last = out.stdout.strip().splitlines()[-1:] or [""]
    if out.returncode != 0 or not last[0].startswith("{"):
        raise RuntimeError(f"locust run failed: {out.stderr[-2000:]}")
    return json.loads(last[0])


def locust_child(url: str, path: str, users: int, requests: int, seconds: float, payload_file: str) -> None:
    """Body of `_locust`: closed-loop clients until `requests` answers or `seconds`; one JSON line out."""
    import random
    import resource

    import gevent
    from locust import FastHttpUser, constant, events, task
    from locust.env import Environment

    bodies = [row["body"].encode() for row in json.loads(Path(payload_file).read_text())]
    rng = random.Random(0)
    samples: list[tuple[float, float, bool]] = []  # (end time, latency ms, ok)

    class Client(FastHttpUser):
        host = url
        wait_time = constant(0)

        @task
        def send(self) -> None:
            headers = {"Content-Type": "application/json"}
            with self.client.post(path, data=rng.choice(bodies), headers=headers, catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"status {r.status_code}")

    def on_request(response_time: float, exception: Any, **_: Any) -> None:
        samples.append((time.perf_counter(), float(response_time), exception is None))

    env = Environment(user_classes=[Client], events=events)
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    runner.start(users, spawn_rate=users)
    while len(samples) < requests and time.perf_counter() - start < seconds:
        gevent.sleep(0.02)
    runner.quit()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kept = samples[:requests]
    warm = min(max(10, 2 * users), len(kept) // 4)  # the first answers include connection set-up: left out
    measured = kept[warm:]
    span = measured[-1][0] - kept[warm - 1][0] if warm and measured else 0.0
    lat = sorted(s[1] for s in measured)
    print(
        json.dumps(
            {
                "users": users,
                "requests": len(kept),
                "errors": sum(not ok for _, _, ok in kept),
                "measured": len(measured),
                "rps": len(measured) / span if span > 0 else 0.0,
                "latencies_ms": lat,
                "wall_s": time.perf_counter() - start,
                "client_cpu_s": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
            }
        )
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ------------------------------------------------------------------------------------------ bare forward
class ForwardProbe:
    """A child process holding the run's model: `measure(n)` times n batch-1 forwards on pre-collated records."""

    def __init__(self, run: str, payloads: Path) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_forward", run, str(payloads)]
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the forward probe did not start")

    def measure(self, n: int) -> dict[str, float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def forward_child(run: str, payload_file: str) -> None:
    """Body of `_forward`: per line n on stdin, the median ms of n bare forwards and of n `Predictor.predict`."""
    from mmfuse.predict import Predictor
    from mmfuse.utils import move_to

    rows = json.loads(Path(payload_file).read_text())[:64]
    predictor = Predictor(run, "cpu")
    records = []
    for row in rows:
        recs, _ = predictor.check(predictor.records_from_fields({"image": row["image_path"], "text": row["text"]}))
        records += recs
    batches = [move_to(b["inputs"], predictor.device) for b in predictor.batches(records, 1)]
    batches16 = [move_to(b["inputs"], predictor.device) for b in predictor.batches(records, 16)]
    print("ready", flush=True)
    for line in sys.stdin:
        # Timed on a worker thread, as the server runs its model (on this machine, under load, torch's 2-thread
        # pool on the main thread is several times slower than on a fresh thread: that would flatter the server).
        figures: dict[str, list[float]] = {}
        worker = threading.Thread(
            target=_time_forward, args=(predictor, records, batches, batches16, int(line), figures)
        )
        worker.start()
        worker.join()
        print(json.dumps({k: statistics.median(v) for k, v in figures.items()}), flush=True)


def _time_forward(
    predictor: Any, records: list[Any], batches: list[Any], batches16: list[Any], n: int, out: dict
) -> None:
    import torch

    forward, forward16, predict = [], [], []
    with torch.inference_mode():
        for i in range(n):
            start = time.perf_counter()
            predictor.model(batches[i % len(batches)])
            forward.append((time.perf_counter() - start) * 1000)
        for i in range(max(2, n // 16)):
            start = time.perf_counter()
            predictor.model(batches16[i % len(batches16)])
            forward16.append((time.perf_counter() - start) * 1000 / 16)
    for i in range(max(1, n // 2)):
        start = time.perf_counter()
        predictor.predict([records[i % len(records)]], batch_size=1)
        predict.append((time.perf_counter() - start) * 1000)
    out.update(forward_ms=forward, forward16_ms_per_record=forward16, predict_ms=predict)


# ------------------------------------------------------------------------------------------ phases
class Bench:
    def __init__(self, args: argparse.Namespace, payloads: Path) -> None:
        self.args, self.payloads = args, payloads
        self.runs: list[dict[str, Any]] = []

    def load(
        self, server: ServerProcess, users: int, requests: int, path: str = "/predict", soak: bool = False
    ) -> dict[str, Any]:
        before, cpu0 = server.stats(), server.cpu_seconds()
        load0 = os.getloadavg()[0]
        r = locust_run(server.url, path, users, requests, self.args.phase_seconds, self.payloads)
        after, cpu1 = server.stats(), server.cpu_seconds()
        batches = after["batches"] - before["batches"]
        r.update(
            side=server.name,
            path=path,
            server_cpu_s_per_request=(cpu1 - cpu0) / max(1, r["requests"]),
            mean_batch=(after["records"] - before["records"]) / batches if batches else 0.0,
            model_ms_per_batch=1000 * (after["model_seconds"] - before["model_seconds"]) / batches if batches else 0.0,
            load_avg_1min=load0,
            soak=soak,
        )
        self.runs.append(r)
        short = {k: r[k] for k in ("side", "path", "users", "requests", "errors", "mean_batch")}
        p50 = pct(r["latencies_ms"], 50)
        print(f"  {short} {r['rps']:.1f} req/s, p50 {p50:.1f} ms, load {load0:.1f}", flush=True)
        return r

    def requests_for(self, users: int) -> int:
        base = {1: 80, 4: 400, 16: 1200, 64: 2000}[users]
        return max(4 * users, int(base * self.args.scale))


def soak(server: ServerProcess, bench: Bench, n: int) -> dict[str, Any]:
    """n requests at 16 clients with the server's RSS and answered count sampled every 0.5 s."""
    samples: list[tuple[int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((server.stats()["answered"], server.rss_mb()))
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    start_answered = server.stats()["answered"]
    thread.start()
    seconds, bench.args.phase_seconds = bench.args.phase_seconds, bench.args.soak_seconds
    try:
        run = bench.load(server, 16, n, soak=True)
    finally:
        bench.args.phase_seconds = seconds
        stop.set()
        thread.join()
    points = [(a - start_answered, rss) for a, rss in samples]
    warm = [rss for a, rss in points if a >= min(1000, n // 10)]
    first = warm[0] if warm else float("nan")
    return {
        "requests": run["requests"],
        "errors": run["errors"],
        "rps": run["rps"],
        "rss_mb_at_start": points[0][1] if points else float("nan"),
        "rss_mb_after_1000": first,
        "rss_mb_end": points[-1][1] if points else float("nan"),
        "rss_mb_max": max((r for _, r in points), default=float("nan")),
        "rss_samples": points,
        "p50_ms": pct(run["latencies_ms"], 50),
        "p99_ms": pct(run["latencies_ms"], 99),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    payloads = work / "payloads.json"
    write_payloads(payloads, QUESTION_POOL)
    bench = Bench(args, payloads)
    servers: list[ServerProcess] = []
    probe = None
    started = time.time()
    try:
        dynamic = ServerProcess(
            args.run, "dynamic", ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        )
        servers.append(dynamic)
        off = ServerProcess(args.run, "off", ["--max-batch", "1", "--max-wait-ms", "0"])
        servers.append(off)
        probe = ForwardProbe(args.run, payloads)
        for server in servers:  # warm-up: first requests load lazily-initialised paths
            locust_run(server.url, "/predict", 4, 40, 60, payloads)
        latency: list[dict[str, float]] = []
        for users in args.users:
            n = bench.requests_for(users)
            # 1 client: many short rounds (bare forward, /noop, both servers) so that the load of this shared
            # machine moves all four alike; more clients: fewer, longer rounds.
            rounds = args.rounds * 3 if users == 1 else args.rounds
            for r in range(rounds):
                print(f"{users} client(s), round {r + 1}/{rounds}", flush=True)
                if users == 1:
                    f = probe.measure(30)
                    noop = bench.load(dynamic, 1, n, "/noop")
                order = [dynamic, off] if r % 2 == 0 else [off, dynamic]
                got = {s.name: bench.load(s, users, n) for s in order}
                if users == 1:
                    latency.append(
                        {
                            **f,
                            "noop_p50_ms": pct(noop["latencies_ms"], 50),
                            "off_p50_ms": pct(got["off"]["latencies_ms"], 50),
                            "off_model_ms": got["off"]["model_ms_per_batch"],
                            "dynamic_p50_ms": pct(got["dynamic"]["latencies_ms"], 50),
                        }
                    )
        soak_result = soak(dynamic, bench, args.soak) if args.soak else None
    finally:
        if probe is not None:
            probe.stop()
        for server in servers:
            server.stop()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "wall_s": time.time() - started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "config": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "rounds": args.rounds},
        "runs": bench.runs,
        "latency_rounds": latency,
        "soak": soak_result,
    }


def machine() -> dict[str, Any]:
    import platform

    import torch

    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_end": os.getloadavg(),
    }


# ------------------------------------------------------------------------------------------ report
def table(result: dict[str, Any]) -> str:
    lines = [
        "| server | clients | requests | errors | req/s (median of rounds) | p50 ms | p95 ms | p99 ms | mean batch "
        "| server CPU ms/request | Locust CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[bool, str, str, int], list[dict[str, Any]]] = {}
    for r in result["runs"]:
        groups.setdefault((r["soak"], r["path"], r["side"], r["users"]), []).append(r)
    for (soak, path, side, users), runs in sorted(groups.items()):
        lat = [x for r in runs for x in r["latencies_ms"]]
        name = side if path == "/predict" else f"{side} {path}"
        name += " (soak)" if soak else ""
        lines.append(
            f"| {name} | {users} | {sum(r['requests'] for r in runs):,} | {sum(r['errors'] for r in runs)} "
            f"| {statistics.median(r['rps'] for r in runs):.1f} | {pct(lat, 50):.1f} | {pct(lat, 95):.1f} "
            f"| {pct(lat, 99):.1f} | {statistics.mean(r['mean_batch'] for r in runs):.2f} "
            f"| {1000 * statistics.mean(r['server_cpu_s_per_request'] for r in runs):.1f} "
            f"| {1000 * sum(r['client_cpu_s'] for r in runs) / max(1, sum(r['requests'] for r in runs)):.1f} |"
        )
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> str:
    out = ["| target | measured | per-round values | verdict |", "|---|---|---|---|"]
    rounds = result["latency_rounds"]
    if rounds:
        ratios = [r["off_p50_ms"] / (r["forward_ms"] + r["noop_p50_ms"]) for r in rounds]
        ratio = statistics.median(ratios)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        out.append(
            f"| batch-1 latency <= 1.2x (bare forward + HTTP overhead) | {ratio:.2f}x: {med['off_p50_ms']:.1f} ms vs "
            f"{med['forward_ms']:.1f} + {med['noop_p50_ms']:.1f} ms | {', '.join(f'{x:.2f}' for x in ratios)} "
            f"| **{'met' if ratio <= 1.2 else 'missed'}** |"
        )
    if rounds:
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        out.append(
            f"| (context) batch-1 medians: `Predictor.predict` alone {med['predict_ms']:.1f} ms; in the server, time "
            f"in the worker's predict {med['off_model_ms']:.1f} ms a request; the dynamic server at 1 client "
            f"{med['dynamic_p50_ms']:.1f} ms (it waits up to --max-wait-ms for company) | | | |"
        )
    if rounds:
        ceiling = statistics.median(r["forward_ms"] / r["forward16_ms_per_record"] for r in rounds)
        out.append(
            f"| (context) bare forward per record, batch 1 / batch 16: what batching can gain at most in the model | "
            f"{ceiling:.2f}x | | |"
        )
    by = {}
    for r in result["runs"]:
        if r["users"] == 16 and r["path"] == "/predict" and not r["soak"]:
            by.setdefault(r["side"], []).append(r["rps"])
    if by.get("dynamic") and by.get("off"):
        ratios = [a / b for a, b in zip(by["dynamic"], by["off"])]
        ratio = statistics.median(ratios)
        out.append(
            f"| 16 clients: req/s with dynamic batching >= 3x batching off | {ratio:.2f}x "
            f"({statistics.median(by['dynamic']):.1f} vs {statistics.median(by['off']):.1f} req/s) "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} | **{'met' if ratio >= 3 else 'missed'}** |"
        )
    s = result["soak"]
    if s:
        growth = s["rss_mb_end"] / s["rss_mb_after_1000"] - 1
        ok = s["errors"] == 0 and s["requests"] >= 10_000 and growth <= 0.05
        out.append(
            f"| soak: >= 10,000 requests, zero errors, flat RSS | {s['requests']:,} requests, {s['errors']} errors; "
            f"RSS {s['rss_mb_after_1000']:.0f} MB after 1,000 -> {s['rss_mb_end']:.0f} MB at the end "
            f"(max {s['rss_mb_max']:.0f}, {100 * growth:+.1f}%) | | **{'met' if ok else 'missed'}** |"
        )
    errors = sum(r["errors"] for r in result["runs"])
    total = sum(r["requests"] for r in result["runs"])
    out.append(
        f"| zero errors over every run | {errors} errors in {total:,} requests | "
        f"| **{'met' if not errors else 'missed'}** |"
    )
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished run directory (e.g. the built-in easy-VQA run)")
    p.add_argument("--users", default="1,4,16,64", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per client count (default 2)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the requests of each load run")
    p.add_argument("--phase-seconds", type=float, default=60.0, help="time bound of each load run (default 60)")
    p.add_argument("--soak", type=int, default=10_000, help="requests of the soak run (0: none)")
    p.add_argument("--soak-seconds", type=float, default=900.0, help="time bound of the soak run (default 900)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, few requests, short soak")
    p.add_argument("--out", default=str(HERE / "serve_results.json"), help="where to write every figure")
    args = p.parse_args(argv)
    args.users = [int(u) for u in args.users.split(",")]
    if any(u not in USERS for u in args.users):
        p.error(f"--users: choose among {USERS}")
    if args.quick:
        args.rounds, args.scale, args.soak = 1, 0.1, min(args.soak, 300)
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_locust"]:
        url, path, users, requests, seconds, payloads = argv[1:]
        locust_child(url, path, int(users), int(requests), float(seconds), payloads)
        return 0
    if argv[:1] == ["_forward"]:
        forward_child(argv[1], argv[2])
        return 0
    args = parse_args(argv)
    result = run_all(args)
    report = f"{table(result)}\n\n{targets(result)}"
    print("\n" + report)
    slim = {**result, "runs": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in result["runs"]]}
    Path(args.out).write_text(json.dumps(slim, indent=1))
    print(f"\n{result['date']}, {result['wall_s']:.0f} s; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
