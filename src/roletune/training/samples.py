"""Watch the character emerge: answers to a few prompts before training and after every epoch,
next to the reference reply, printed, logged to the tracker and appended to samples.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from roletune.decoding import Session, answer_all, decoding_config
from roletune.training.time_spent import TimeSpent
from roletune.training.track import Tracker

SAMPLES_NAME = "samples.jsonl"


def sample_rows(cfg, heldout: list) -> list[dict]:
    """`eval.sample_prompts`, or the first `eval.samples` held-out conversations with their replies."""
    if cfg.eval.sample_prompts:
        return [{"messages": [{"role": "user", "content": p}], "prompt": p, "reference": None}
                for p in cfg.eval.sample_prompts]
    rows = []
    for conversation in heldout[:cfg.eval.samples]:
        turns = [m.as_dict() for m in conversation]
        rows.append({"messages": turns[:-1], "prompt": turns[-2]["content"], "reference": turns[-1]["content"]})
    return rows


class SampleAnswers(TrainerCallback):
    def __init__(self, rows: list[dict], tokenizer, system_prompt: str | None, tracker: Tracker,
                 output_dir: str, max_new_tokens: int, batch_size: int, echo=print, every_rank: bool = False,
                 time_spent: TimeSpent | None = None):
        self.rows, self.tokenizer, self.system_prompt = rows, tokenizer, system_prompt
        self.every_rank = every_rank  # a model sharded across ranks answers only if every rank joins in
        self.tracker, self.path, self.echo = tracker, Path(output_dir) / SAMPLES_NAME, echo
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.time_spent = time_spent or TimeSpent()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a resumed run already has its earlier answers
            self.answer(model, args, state, epoch=0)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_training_stop and state.global_step < state.max_steps:
            return  # stopped early (a signal): no time for generation, and the epoch is not done
        self.answer(model, args, state, epoch=round(state.epoch or 0))

    def answer(self, model, args, state, epoch: int) -> None:
        if not self.rows or not (state.is_world_process_zero or self.every_rank):
            return
        with self.time_spent.on("sample_answers"):
            replies = self.generate(model, args)
        if not state.is_world_process_zero:
            return
        results = [{"epoch": epoch, "step": state.global_step, "prompt": r["prompt"], "answer": reply.text,
                    "reference": r["reference"], "stopped": reply.stopped} for r, reply in zip(self.rows, replies)]
        with open(self.path, "a", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in results)
        self.tracker.log_samples(results, state.global_step)
        self.echo(f"sample answers, epoch {epoch} (step {state.global_step}):")
        for row in results:
            self.echo(f"  Q: {row['prompt']}\n  A: {row['answer']}\n  reference: {row['reference'] or '-'}")

    def generate(self, model, args) -> list:
        session = Session(model, self.tokenizer, self.system_prompt, True, args.device)
        config = decoding_config(session, greedy=True, max_new_tokens=self.max_new_tokens)
        was_training = model.training
        model.eval()
        try:
            # Compiled layers (train.compile) are for training steps: generation's growing KV cache would
            # compile them anew (and, under CUDA graphs, record them) for shapes used once.
            with torch.compiler.set_stance("force_eager"):
                return answer_all(session, [r["messages"] for r in self.rows], config, self.batch_size)
        finally:
            model.train(was_training)
