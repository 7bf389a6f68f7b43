"""API load: N clients send chat completions back to back for T seconds; errors and latency.

    python benchmarks/bench_api_load.py --url http://127.0.0.1:8000 [--clients 16] [--seconds 60]
        [--max-tokens 16] [--stream] [--api-key K] [--json]

Each client is a thread with its own keep-alive connection that sends the next request as soon
as the last one is answered (closed loop), so the figures show what a server does when it is
kept busy. Only the address given is ever contacted. Prints requests, answers by status, errors
(anything but 200, and failed connections), and the p50/p99 latency of the 200s.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlsplit


def one_client(host: str, port: int, body: bytes, headers: dict, deadline: float, stream: bool,
               results: list) -> None:
    connection = None
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            if connection is None:
                connection = http.client.HTTPConnection(host, port, timeout=120)
            connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            ok = answer.status == 200 and (b"[DONE]" in data if stream else b'"choices"' in data)
            results.append((answer.status if ok or answer.status != 200 else "bad body",
                            time.monotonic() - started))
            if answer.status == 429:
                time.sleep(float(answer.getheader("Retry-After", "1")))
        except (OSError, http.client.HTTPException) as exc:
            results.append((type(exc).__name__, time.monotonic() - started))
            if connection is not None:
                connection.close()
            connection = None
            time.sleep(0.1)
    if connection is not None:
        connection.close()


def run(url: str, clients: int, seconds: float, max_tokens: int, stream: bool, api_key: str | None,
        model: str) -> dict:
    parts = urlsplit(url)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Tell me about PCs."}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    results: list = []
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=one_client, args=(parts.hostname, parts.port or 80, body, headers,
                                                          deadline, stream, results), daemon=True)
               for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 180)
    ok = sorted(latency for status, latency in results if status == 200)
    by_status: dict = {}
    for status, _ in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    return {"clients": clients, "seconds": seconds, "max_tokens": max_tokens, "stream": stream,
            "requests": len(results), "by_status": by_status, "errors": len(results) - len(ok),
            "p50_s": statistics.median(ok) if ok else None,
            "p99_s": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else None,
            "ok_per_s": len(ok) / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.url, args.clients, args.seconds, args.max_tokens, args.stream, args.api_key, args.model)
    if args.json:
        print(json.dumps(report))
        return
    p50 = f"{report['p50_s'] * 1e3:.0f} ms" if report["p50_s"] is not None else "-"
    p99 = f"{report['p99_s'] * 1e3:.0f} ms" if report["p99_s"] is not None else "-"
    print(f"{report['clients']} clients x {report['seconds']:.0f} s: {report['requests']} requests "
          f"({report['ok_per_s']:.2f} ok/s), errors {report['errors']} {report['by_status']}, "
          f"p50 {p50}, p99 {p99}")


if __name__ == "__main__":
    main()
