"""Data-plane benchmark: one-way hop time on loopback and encode+decode cost per payload size.

    python benchmarks/bench_dataplane.py [--n 2000] [--json]

Target (DESIGN.md): per-hop data-plane overhead <= 0.3 ms on loopback, read off the median of
the 3.5 KB row (one decode step of a 896-wide float32 hidden state); authentication (CurveZMQ,
as exo-lab runs) may add at most 0.05 ms there. The PAIR columns are bare pyzmq sending the
same bytes, the floor that any framing sits on. A last table gives the codec's cost by the rows
of a continuous-batching decode step (each row's KV slot, position and sampling settings ride in
the FORWARD header).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from exo_lab.bench import measure_hop_overhead  # noqa: E402
from exo_lab.sampling import SamplingSettings  # noqa: E402
from exo_lab.wire import Forward, Row, decode, encode  # noqa: E402

TARGET_MS = 0.3
AUTH_TARGET_MS = 0.05      # what authenticating the data plane may add to a 3.5 KB hop
SAMPLING = SamplingSettings(temperature=0.7, top_p=0.9, top_k=40, seed=1234)
# (label, tensor shape, dtype): what travels at each size in a real pipeline
PAYLOADS = [
    ("16 B token ids", (1, 2), torch.int64),
    ("3.5 KB decode step", (1, 1, 896), torch.float32),
    ("64 KB short prefill", (1, 16, 1024), torch.float32),
    ("1 MB prefill", (1, 256, 1024), torch.float32),
]
# rows of a continuous-batching decode step (B, 1, 896): encode+decode cost grows with the rows
BATCH_ROWS = (1, 8, 32, 128)


def codec_us(tensor: torch.Tensor, n: int) -> tuple[float, float]:
    """Median encode and decode time in microseconds; decode reads zmq.Frames, as on the wire.
    The message is a sampled decode step past one stage, one Row per tensor row, so every header
    field is filled in."""
    rows = tuple(Row(slot, 7, SAMPLING) for slot in range(tensor.shape[0]))
    msg = Forward(1, rows, tensor, stage_ms=(0.5,))
    frames = [zmq.Frame(bytes(frame)) for frame in encode(msg)]
    encode_us, decode_us = [], []
    for _ in range(n):
        start = time.perf_counter_ns()
        encode(msg)
        middle = time.perf_counter_ns()
        decode(frames)
        decode_us.append((time.perf_counter_ns() - middle) / 1e3)
        encode_us.append((middle - start) / 1e3)
    return statistics.median(encode_us), statistics.median(decode_us)


def run(n: int) -> list[dict]:
    rows = []
    for label, shape, dtype in PAYLOADS:
        tensor = torch.zeros(shape, dtype=dtype)
        payload_bytes = tensor.nbytes
        hop_n = n if payload_bytes < 256 * 1024 else max(50, n // 4)   # keep 1 MB runs short
        hop = measure_hop_overhead(n=hop_n, payload_bytes=payload_bytes)
        encode_us, decode_us = codec_us(tensor, min(n, 2000))
        rows.append({"payload": label, **hop, "encode_us": encode_us, "decode_us": decode_us})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'payload':<22}{'bytes':>9}{'hop med ms':>12}{'hop p90 ms':>12}{'auth med ms':>13}"
             f"{'auth added':>12}{'PAIR med ms':>13}{'PAIR p90 ms':>13}{'enc+dec us':>12}"]
    for row in rows:
        lines.append(f"{row['payload']:<22}{row['payload_bytes']:>9}{row['hop_median_ms']:>12.3f}"
                     f"{row['hop_p90_ms']:>12.3f}{row['auth_hop_median_ms']:>13.3f}{row['auth_added_ms']:>+12.3f}"
                     f"{row['pair_median_ms']:>13.3f}{row['pair_p90_ms']:>13.3f}"
                     f"{row['encode_us'] + row['decode_us']:>12.1f}")
    step = next(row for row in rows if row["payload_bytes"] == 3584)
    verdict = "meets" if step["hop_median_ms"] <= TARGET_MS else "MISSES"
    lines.append(f"\n3.5 KB hop median {step['hop_median_ms']:.3f} ms {verdict} the "
                 f"<= {TARGET_MS} ms per-hop target (one-way = ping-pong round trip / 2, "
                 "encode and decode included)")
    auth_verdict = "meets" if step["auth_added_ms"] < AUTH_TARGET_MS else "MISSES"
    lines.append(f"CurveZMQ authentication adds {step['auth_added_ms']:+.3f} ms at 3.5 KB: {auth_verdict} "
                 f"the < {AUTH_TARGET_MS} ms target")
    return "\n".join(lines)


def format_batches(n: int) -> str:
    """Encode+decode cost of a decode step by batch rows (no sockets: the codec alone)."""
    lines = [f"\n{'decode step rows':<22}{'bytes':>9}{'encode us':>12}{'decode us':>12}{'us per row':>12}"]
    for count in BATCH_ROWS:
        tensor = torch.zeros(count, 1, 896)
        encode_us, decode_us = codec_us(tensor, n)
        lines.append(f"{count:<22}{tensor.nbytes:>9}{encode_us:>12.1f}{decode_us:>12.1f}"
                     f"{(encode_us + decode_us) / count:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="round trips per payload size")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.n)
    print(json.dumps(rows, indent=2) if args.json else
          format_table(rows) + "\n" + format_batches(min(args.n, 500)))


if __name__ == "__main__":
    main()
