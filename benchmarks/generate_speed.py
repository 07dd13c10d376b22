"""How much faster `roletune generate` (batch 16, left padding, one forward per batch) is than the
tutorial's predict loop (one prompt at a time), on the same prompts, model and decoding, in one run.

usage: python benchmarks/generate_speed.py [MODEL_OR_RUN] [--prompts 32] [--tokens 32] [--device cpu]
Default model: the demo's tiny Qwen2 in .cache/demo-model (built by `make demo`).
Every reply is forced to the same length (min_new_tokens) so both sides do the same work.
"""
import argparse
import json
import platform
import time

import torch

from roletune import decoding


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=".cache/demo-model")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    session = decoding.load_session(args.model, device=args.device)
    config = decoding.decoding_config(session, greedy=True, max_new_tokens=args.tokens)
    config.min_new_tokens = args.tokens
    topics = ["灯塔", "海风", "渔船", "猫", "奶奶的信", "台风", "海蛎煎", "星星"]
    prompts = [[{"role": "user", "content": f"给我讲讲{topics[i % len(topics)]}的事，第{i}次。"}]
               for i in range(args.prompts)]

    decoding.answer_batch(session, prompts[:2], config)  # warm-up (allocator, kernels)
    start = time.perf_counter()
    one_by_one = [decoding.answer_batch(session, [p], config)[0] for p in prompts]
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = decoding.answer_all(session, prompts, config, batch_size=args.batch_size)
    batch_s = time.perf_counter() - start

    tokens = sum(r.tokens for r in batched)
    assert tokens == sum(r.tokens for r in one_by_one) == args.prompts * args.tokens
    print(json.dumps({"model": args.model, "device": args.device, "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "prompts": args.prompts,
                      "new_tokens_each": args.tokens, "one_at_a_time_s": round(loop_s, 2),
                      f"batch{args.batch_size}_s": round(batch_s, 2),
                      "one_at_a_time_tok_s": round(tokens / loop_s, 1),
                      f"batch{args.batch_size}_tok_s": round(tokens / batch_s, 1)}))
    print(f"speedup_batch{args.batch_size}_vs_one_at_a_time={loop_s / batch_s:.2f}")


if __name__ == "__main__":
    main()
