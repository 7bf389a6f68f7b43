"""A bounded soak on loopback: clients through the API while engines are killed and replaced.

    python benchmarks/soak_failover.py [--seconds 120] [--clients 8] [--every 20]

A local cluster of 3 engines serves the demo model on 2 stages (one spare). Every ``--every``
seconds the engine of a random stage is SIGKILLed and a new engine is started (a PC rebooting).
``--clients`` threads send seeded, sampled completions through the official openai client for
``--seconds`` seconds; each answer must equal the same request answered before the soak began.
Prints the requests, the lost ones (errors) and the wrong ones (different text), the failovers
and their pauses. Only 127.0.0.1 is contacted; every process ends with the cluster.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import threading
import time

import exo_lab


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--every", type=float, default=20.0)
    args = parser.parse_args()
    from openai import OpenAI

    with exo_lab.Cluster.local(engines=3, max_cores=1) as cluster:
        cluster.load("demo", min_stages=2, progress=False)
        server = cluster.serve(port=0)
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [f"Request {i}: tell me about office PCs." for i in range(16)]

        def ask(i: int) -> str:
            reply = client.completions.create(model=cluster.model_id, prompt=prompts[i], max_tokens=40,
                                              temperature=0.8, seed=i)
            return reply.choices[0].text

        expected = [ask(i) for i in range(len(prompts))]
        counts = {"requests": 0, "lost": 0, "wrong": 0}
        lock, stop = threading.Lock(), threading.Event()

        def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                i = rng.randrange(len(prompts))
                try:
                    outcome = "wrong" if ask(i) != expected[i] else None
                except Exception:      # any error a client sees is a lost request
                    outcome = "lost"
                with lock:
                    counts["requests"] += 1
                    if outcome:
                        counts[outcome] += 1

        threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(args.clients)]
        for thread in threads:
            thread.start()
        ends, rng, kills = time.monotonic() + args.seconds, random.Random(0), 0
        while time.monotonic() < ends:
            time.sleep(min(args.every, max(0.0, ends - time.monotonic())))
            if time.monotonic() >= ends:
                break
            os.kill(rng.choice(cluster.pipeline.engines).pid, signal.SIGKILL)
            kills += 1
            cluster.control.start_engines(1)
        stop.set()
        for thread in threads:
            thread.join(180)
        metrics = cluster.metrics.snapshot()
    print(f"{args.seconds:.0f} s, {args.clients} clients, {kills} engines killed and replaced: "
          f"{counts['requests']} requests, {counts['lost']} lost, {counts['wrong']} wrong; "
          f"{metrics['failovers_total']} failovers, {metrics['replayed_requests_total']} requests replayed, "
          f"last pause {metrics['last_failover_pause_s'] or 0:.1f} s")
    return 0 if counts["lost"] == counts["wrong"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
