"""The tracker under load: hits per second and latency from a separate process, against a
bare endpoint of the same web stack in the same run.

`python -m bench.tracker [SECONDS] [RATE] [CONCURRENCY]` (defaults 10 s a step, 2,000 hits/s,
16 requests in flight) against the Kafka of KAFKA_BOOTSTRAP_SERVERS, on a fresh topic prefix
(deleted afterwards). It starts, each as its own process: the real tracker
(`python -m services.tracker`, one uvicorn worker), a bare FastAPI app on uvicorn answering
the same 302 without token, classification or Kafka (a plain Starlette route of the app,
like the tracker's hit routes), and the load client (aiohttp,
keep-alive connections, no redirect followed).

Steps, in ROUNDS alternating rounds (each figure the best of its runs, every run listed):
both servers at full speed (CONCURRENCY requests in flight, closed loop):
`tracker_hits_per_s`, `bare_hits_per_s`, `tracker_to_bare_ratio`; then the tracker at a fixed
RATE (open loop: each request's latency counts from when it was due, so a stall is not
hidden): `tracker_p50_ms`, `tracker_p99_ms`, `tracker_rate_achieved`, and the bare endpoint
at the same rate (`bare_p99_ms`: what the machine itself adds). Last, the hits Kafka
acknowledged against those it lost (the tracker's own counters) and the records on the topic.
`tracker_cpu_us_per_hit` / `bare_cpu_us_per_hit`: each server's CPU per request at full
speed, the steadiest figure on a shared machine.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench.proc_cpu import cpu_seconds
from bench.scaleout import free_port
from bench.stats import percentile
from services.common.settings import Settings, load
from services.common.topics import ENGAGEMENT, TopicSpec, ensure_topics, topic_name
from services.engagement.tokens import TrackingKeys

# Requests in flight at full speed: more only measures the client's own overhead (at 64 the
# aiohttp client halved the bare endpoint's rate on the 2-core machine).
CONCURRENCY = 16
ROUNDS = 3
WARMUP_SECONDS = 2.0
# Distinct recipients the load cycles through: hits spread over every partition.
TOKENS = 2_000
KEY = "bench:tracker-bench-secret-0123456789abcdef"
AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
# Bounds a server's start (uvicorn import and bind; the tracker's first metadata request).
START_TIMEOUT_SECONDS = 30.0


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "bare":
        return serve_bare(int(argv[2]))
    if len(argv) > 1 and argv[1] == "load":
        print(json.dumps(asyncio.run(load_run(argv[2], Path(argv[3]), argv[4], float(argv[5]),
                                              float(argv[6])))))
        return 0
    seconds = float(argv[1]) if len(argv) > 1 else 10.0
    rate = float(argv[2]) if len(argv) > 2 else 2_000.0
    concurrency = int(argv[3]) if len(argv) > 3 else CONCURRENCY
    print(json.dumps(measure(load(Settings), seconds, rate, concurrency), indent=2))
    return 0


def measure(settings: Settings, seconds: float, rate: float,
            concurrency: int = CONCURRENCY) -> dict[str, Any]:
    isolated = settings.replace(topic_prefix=f"bench{uuid.uuid4().hex[:8]}.")
    ensure_topics(isolated, specs=(ENGAGEMENT,))
    tracker_port, bare_port, metrics_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as folder:
        tokens = write_tokens(Path(folder) / "tokens", "bench", "cmp-bench")
        tracker = start_tracker(isolated, tracker_port, metrics_port)
        bare = subprocess.Popen([sys.executable, "-m", "bench.tracker", "bare", str(bare_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            tracker_url, bare_url = f"http://127.0.0.1:{tracker_port}", f"http://127.0.0.1:{bare_port}"
            wait_serving(tracker_port)
            wait_serving(bare_port)
            # Alternating rounds, each mode's best: interference on a shared machine only
            # ever slows a run down, and a drift weighs on both modes alike.
            fulls, bares, paced_runs, bare_paced = [], [], [], []
            for _ in range(ROUNDS):
                fulls.append(load_step(tracker_url, tokens, "closed", concurrency, seconds, tracker.pid))
                bares.append(load_step(bare_url, tokens, "closed", concurrency, seconds, bare.pid))
                paced_runs.append(load_step(tracker_url, tokens, "open", rate, seconds))
                bare_paced.append(load_step(bare_url, tokens, "open", rate, seconds))
            full = max(fulls, key=lambda run: run["rate"])
            bare_full = max(bares, key=lambda run: run["rate"])
            paced = min(paced_runs, key=lambda run: run["p99_ms"])
            time.sleep(1.5)  # the last delivery reports
            counters = _counters(f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            for process in (tracker, bare):
                process.terminate()
                process.wait(15)
    on_topic = records_on_topic(isolated)
    delete_topics(isolated)
    return {
        "tracker_hits_per_s": round(full["rate"], 1),
        "bare_hits_per_s": round(bare_full["rate"], 1),
        "tracker_to_bare_ratio": round(full["rate"] / bare_full["rate"], 3),
        "tracker_cpu_us_per_hit": round(min(run.get("cpu_us", 0.0) for run in fulls), 1),
        "bare_cpu_us_per_hit": round(min(run.get("cpu_us", 0.0) for run in bares), 1),
        "tracker_concurrency": concurrency,
        "tracker_full_speed_p99_ms": full["p99_ms"],
        "tracker_rate_target": rate,
        "tracker_rate_achieved": round(paced["rate"], 1),
        "tracker_p50_ms": paced["p50_ms"],
        "tracker_p99_ms": paced["p99_ms"],
        "bare_p99_ms": min(run["p99_ms"] for run in bare_paced),
        "tracker_errors": sum(run["errors"] for run in fulls + paced_runs),
        "tracker_runs_hits_per_s": [round(run["rate"], 1) for run in fulls],
        "bare_runs_hits_per_s": [round(run["rate"], 1) for run in bares],
        "tracker_runs_p99_ms": [run["p99_ms"] for run in paced_runs],
        "tracker_hits_acknowledged": counters["acked"],
        "tracker_hits_lost": counters["lost"],
        "tracker_records_on_topic": on_topic,
        "tracker_step_seconds": seconds,
    }


def write_tokens(path: Path, tenant: str, campaign: str) -> Path:
    """TOKENS click tokens of `campaign`, one a line, signed with KEY for mail sent an hour
    ago (no hit is "right after delivery"), each recipient's mail with one link."""
    keys = TrackingKeys.parse(KEY)
    sent_at = int(time.time()) - 3600
    path.write_text("\n".join(
        keys.sign_click(tenant, campaign, f"c{i}", sent_at=sent_at, link_index=0,
                        links_in_mail=1, url=f"https://shop.example/p/{i}")
        for i in range(TOKENS)))
    return path


def start_tracker(settings: Settings, port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    """The real tracker as its own process on `settings`' broker and topic prefix, verifying
    KEY; answering once `wait_serving(port)` returns."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
           "TOPIC_PREFIX": settings.topic_prefix, "TRACKER_KEYS": KEY,
           "TRACKER_PORT": str(port), "METRICS_PORT": str(metrics_port)}
    return subprocess.Popen([sys.executable, "-m", "services.tracker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load_step(base: str, tokens: Path, mode: str, param: float, seconds: float,
          server: int | None = None) -> dict[str, Any]:
    """One step of the load client, in a process of its own; with the `server`'s pid, the
    CPU it spent per request (warm-up included): a figure other processes hardly disturb."""
    before = cpu_seconds(server) if server else None
    out = subprocess.run(
        [sys.executable, "-m", "bench.tracker", "load", base, str(tokens), mode, str(param),
         str(seconds)], capture_output=True, text=True, check=True, timeout=seconds * 3 + 60)
    result = dict(json.loads(out.stdout))
    after = cpu_seconds(server) if server else None
    if before is not None and after is not None and result["requests"]:
        result["cpu_us"] = (after - before) / result["requests"] * 1e6
    return result


async def load_run(base: str, tokens_file: Path, mode: str, param: float,
                   seconds: float) -> dict[str, Any]:
    """GET /c/<token> for `seconds` after a warm-up: `closed` keeps `param` requests in
    flight; `open` starts `param` requests a second, each timed from when it was due."""
    import aiohttp

    urls = [f"{base}/c/{token}" for token in tokens_file.read_text().split()]
    latencies: list[float] = []
    errors = requests = 0
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 4)
    async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": AGENT}) as http:

        async def hit(i: int, due: float, record: bool) -> None:
            nonlocal errors, requests
            requests += 1
            try:
                async with http.get(urls[i % len(urls)], allow_redirects=False) as answer:
                    await answer.read()
                    ok = answer.status == 302
            except aiohttp.ClientError:
                ok = False
            if record:
                latencies.append(time.perf_counter() - due)
                errors += not ok

        for phase, length in (("warm-up", WARMUP_SECONDS), ("measure", seconds)):
            record = phase == "measure"
            latencies.clear()
            start = time.perf_counter()
            end = start + length
            if mode == "closed":
                counter = iter(range(10**12))

                async def worker(end: float = end, record: bool = record,
                                 counter: Any = counter) -> None:
                    while (now := time.perf_counter()) < end:
                        await hit(next(counter), now, record)

                await asyncio.gather(*(worker() for _ in range(int(param))))
            else:
                pending: set[asyncio.Task[None]] = set()
                i = 0
                while (due := start + i / param) < end:
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.create_task(hit(i, due, record))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    i += 1
                await asyncio.gather(*pending)
            took = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {"rate": len(ms) / took, "errors": errors, "requests": requests,
            "p50_ms": round(percentile(ms, 50) or 0.0, 2), "p99_ms": round(percentile(ms, 99) or 0.0, 2)}


def serve_bare(port: int) -> int:
    """The same web stack with nothing behind it: a fixed 302 from a plain Starlette route
    of a FastAPI app, as the tracker's hit routes are, on uvicorn with the same options."""
    import uvicorn
    from fastapi import FastAPI, Request, Response

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    async def click(request: Request) -> Response:
        return Response(status_code=302, headers={"Location": "https://shop.example/"})

    app.add_route("/c/{token}", click, methods=["GET", "HEAD"], include_in_schema=False)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


def wait_serving(port: int) -> None:
    """Until a server answers on `port` (any status: redirects are not followed)."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/c/x")
            connection.getresponse().read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers on port {port}") from None
            time.sleep(0.2)
        finally:
            connection.close()


def _counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - our own loopback URL
        text = answer.read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))

    return {"acked": total("campaign_tracker_hits_total"),
            "lost": total("campaign_tracker_hits_lost_total")}


def records_on_topic(settings: Settings) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": f"bench-{uuid.uuid4()}"})
    try:
        topic = topic_name(ENGAGEMENT, settings)
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(high - low for low, high in (
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts))
    finally:
        consumer.close()


def delete_topics(settings: Settings, specs: tuple[TopicSpec, ...] = (ENGAGEMENT,)) -> None:
    from services.common.kafka import make_admin

    admin = make_admin(settings.kafka_bootstrap_servers)
    for future in admin.delete_topics([topic_name(spec, settings) for spec in specs],
                                      operation_timeout=30).values():
        future.result()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
