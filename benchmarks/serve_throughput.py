"""Throughput of `roletune serve` at 1, 8 and 32 concurrent clients, against one request at a time, in one
run: the same server, prompts and reply length (greedy, every reply max_tokens long, on the base, which
does not stop early). Prints tokens/s, the ratio to one client, and p50 / p95 latency per request.

First, with no server running, it times the base's own generate() on 1, 8 and 32 prompts at once: the
most batching can give on this model and machine, whatever the server does. (On the demo model the LM
head, 64 x 151,936, is nearly all of a decoding step's work and grows with the rows, so that ceiling is
low; on a 7B model a step is bound by reading the weights, which rows share.)

usage: python benchmarks/serve_throughput.py [RUN] [--requests 32] [--tokens 32] [--device cpu]
Default run: runs/demo (`make demo`). The server is started as `roletune serve` on a free local port and
spoken to with the official openai client.
"""
import argparse
import concurrent.futures
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import torch
from openai import OpenAI


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", default="runs/demo")
    parser.add_argument("--requests", type=int, default=32, help="requests at each concurrency")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    ceilings = ceiling(args.run, args.tokens, args.device)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "roletune", "serve", args.run, "--port", str(port),
                               "--device", args.device], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = wait_for(f"http://127.0.0.1:{port}")
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id  # the base: it talks until max_tokens, so every reply is as long

        def ask(i: int) -> tuple[float, int]:
            started = time.perf_counter()
            reply = client.chat.completions.create(model=model, temperature=0, max_tokens=args.tokens,
                                                   messages=[{"role": "user", "content": f"第{i}个问题：讲个故事。"}])
            return time.perf_counter() - started, reply.usage.completion_tokens

        ask(0)  # warm-up
        results, base = {}, None
        for clients in (1, 8, 32):
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(ask, range(args.requests)))
            wall = time.perf_counter() - started
            latencies = sorted(latency for latency, _ in done)
            rate = sum(tokens for _, tokens in done) / wall
            base = base or rate
            results[clients] = {"tokens_per_s": round(rate, 1), "vs_one_at_a_time": round(rate / base, 2),
                                "p50_s": round(statistics.median(latencies), 3),
                                "p95_s": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 3)}
            print(f"{clients:>2} clients: {rate:8.1f} tokens/s  x{rate / base:5.2f}  "
                  f"p50 {results[clients]['p50_s']:.3f} s  p95 {results[clients]['p95_s']:.3f} s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {args.device}",
                      "torch": torch.__version__, "requests": args.requests, "tokens": args.tokens,
                      "generate_ceiling": ceilings, "results": results}, indent=2))


def ceiling(run: str, tokens: int, device: str) -> dict:
    """tokens/s of the base's generate() on 1, 8 and 32 rows, greedy, every row `tokens` long."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roletune.run_dir import open_run

    base = open_run(run).base
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
    rates = {}
    for rows in (1, 1, 8, 32):  # the first pass warms up
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"第{i}个问题：讲个故事。"}],
                                                 tokenize=False, add_generation_prompt=True) for i in range(rows)]
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        times = []
        for _ in range(5):  # the median of five: one call is a fraction of a second
            started = time.perf_counter()
            with torch.inference_mode():
                model.generate(**batch, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                               pad_token_id=tokenizer.pad_token_id)
            times.append(time.perf_counter() - started)
        rates[rows] = rows * tokens / statistics.median(times)
    for rows, rate in rates.items():
        print(f"generate() on {rows:>2} rows: {rate:8.1f} tokens/s  x{rate / rates[1]:5.2f}  (the ceiling)", flush=True)
    return {rows: {"tokens_per_s": round(rate, 1), "vs_one_row": round(rate / rates[1], 2)}
            for rows, rate in rates.items()}


def wait_for(url: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return url
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"{url}: the server did not come up") from None
            time.sleep(0.5)


if __name__ == "__main__":
    main()
