"""Throughput of `instructkit serve` with dynamic batching vs one request at a time.

Starts the server in-process on a loopback port with a tiny model, sends the same set of greedy chat
requests from many client threads through the official `openai` client, and reports requests/s and
generated tokens/s for each ``--max-batch``, median of ``--runs`` runs.

    .venv/bin/python bench/serve_batching.py --preset micro --requests 64 --concurrency 16 --runs 3
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def run_once(model, tok, max_batch: int, n_requests: int, concurrency: int, max_tokens: int) -> tuple[float, int, float]:
    import openai
    import uvicorn

    from instructkit.serve import Engine, ServerLimits, build_app

    engine = Engine(model, tok, ServerLimits(max_batch=max_batch, max_queue=n_requests)).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(engine, "bench"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="x", max_retries=0)

    def one(i: int) -> int:
        # min_tokens is not an OpenAI parameter; a random model rarely emits its end-of-turn token, so
        # nearly every request decodes max_tokens tokens.
        r = client.chat.completions.create(model="bench", max_tokens=max_tokens, temperature=0,
                                           messages=[{"role": "user", "content": f"Request {i}: count up."}])
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(n_requests)))
    elapsed = time.perf_counter() - t0
    server.should_exit = True
    thread.join()
    engine.close()
    return elapsed, tokens, engine.stats["sequences"] / max(1, engine.stats["batches"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="micro", choices=["nano", "micro", "small"])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    import torch

    from instructkit.models import load_for_inference
    from instructkit.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(f"{tmp}/m", preset=args.preset, seed=0)
        model, tok = load_for_inference(model_dir)
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, device {next(model.parameters()).device}")
        print(f"{args.preset} model, {args.requests} requests, {args.concurrency} concurrent clients, "
              f"max_tokens {args.max_tokens}, greedy; median of {args.runs} runs")
        print(f"{'max_batch':>9s} {'seconds':>8s} {'req/s':>7s} {'tok/s':>8s} {'seq/batch':>9s}")
        base = None
        for b in (int(x) for x in args.batches.split(",")):
            runs = [run_once(model, tok, b, args.requests, args.concurrency, args.max_tokens)
                    for _ in range(args.runs)]
            sec = statistics.median(r[0] for r in runs)
            toks = statistics.median(r[1] for r in runs)
            per_batch = statistics.median(r[2] for r in runs)
            base = base or sec
            print(f"{b:9d} {sec:8.2f} {args.requests / sec:7.1f} {toks / sec:8.0f} {per_batch:9.1f}   x{base / sec:.2f}")


if __name__ == "__main__":
    main()
