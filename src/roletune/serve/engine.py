"""What `roletune serve` answers with: one copy of the base weights, every run's adapter on it, and a
worker that answers the waiting requests in batches.

Each run is a character: its adapter (a peft adapter of its own name), its system prompt and its
tokenizer's chat template and stop tokens; the base answers under its own name. A request picks one
with `model`. The worker takes every waiting request that samples alike into one generate() call, each
row with its own adapter (peft's `adapter_names`, `__base__` for the base), its own max_tokens and its
own stream; requests that arrive meanwhile wait for the next call. (transformers' continuous batching,
which lets a request join at the next decoding step, takes no adapter per request.) An idle worker that
gets a request waits GATHER seconds for others sent with it, longer (up to GATHER_MORE) while the server
is still reading some, so requests sent together (the web page's two panes, a client's parallel calls)
decode together.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from roletune.decoding import Session, decoding_config, stop_token_ids, with_system
from roletune.errors import RunError
from roletune.model import check_weight_files, load_base_model, load_tokenizer, resolve_device, resolve_dtype
from roletune.run_dir import open_run

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass
class Character:
    """One model id the server answers as."""
    name: str
    adapter: str | None  # the peft adapter's name; None for the base (or a plain model)
    system_prompt: str | None
    tokenizer: object


@dataclass
class Answer:
    """What a finished generation reports after its text."""
    finish_reason: str  # "stop" (end of turn, eos or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


class Busy(Exception):
    """The queue of waiting requests is full."""


class Engine:
    def __init__(self, runs: list[tuple[str | None, str]], *, base_model: str | None = None, device: str = "auto",
                 dtype: str | None = None, quantization: str | None = None, queue_size: int = 64):
        opened = open_runs(runs, base_model)
        adapted = [(name, location, run) for name, location, run in opened if run.adapter]
        names = [name for name, _, _ in opened]
        first = opened[0][2]
        self.device = resolve_device(device)
        model_cfg = dataclasses.replace(first.model_cfg, path=first.base, dtype=dtype or first.model_cfg.dtype,
                                        quantization=quantization or first.model_cfg.quantization)
        for _, _, run in adapted:
            check_weight_files(run.adapter)  # before the base loads
        tokenizers: dict[str, object] = {}  # by location: runs of one base usually hold the same files

        def tokenizer_at(location: str):
            if location not in tokenizers:
                tokenizers[location] = load_tokenizer(dataclasses.replace(model_cfg, tokenizer=location))
            return tokenizers[location]

        base_tokenizer = tokenizer_at(first.tokenizer)
        model = load_base_model(model_cfg, self.device, resolve_dtype(model_cfg.dtype, self.device))
        self.characters: dict[str, Character] = {}
        if adapted:
            from peft import PeftModel

            base_name = base_id(first.base)
            self.characters[base_name] = Character(base_name, None, None, base_tokenizer)
            for index, (name, location, run) in enumerate(adapted):
                if index == 0:
                    model = PeftModel.from_pretrained(model, run.adapter, adapter_name=name)
                else:
                    model.load_adapter(run.adapter, adapter_name=name)
                self.characters[name] = Character(name, name, run.system_prompt, tokenizer_at(run.tokenizer))
        else:
            name = names[0]
            self.characters[name] = Character(name, None, first.system_prompt, base_tokenizer)
        self.model = model.eval()
        self.adapted = bool(adapted)
        self.queue_size, self.waiting, self.counting = queue_size, 0, threading.Lock()
        self.reading = 0  # requests the server has begun to read and not yet submitted
        self.jobs: queue.Queue = queue.Queue()
        self.pending: collections.deque = collections.deque()  # taken from `jobs`, not yet in a batch
        self.batch_sizes: list[int] = []  # requests per generate() call so far (/health, benchmarks and tests)
        threading.Thread(target=self._work, name="roletune-serve-engine", daemon=True).start()

    def submit(self, character: Character, ids: list[int], emit, *, max_tokens: int, temperature=None,
               top_p=None, stop: list[str] | None = None, seed: int | None = None) -> Job:
        """Queue a generation of the prompt `ids` (from prompt_ids): `emit` is called, from the engine's thread,
        with each text piece, then an Answer (or the exception that stopped it). Busy when `queue_size`
        requests are waiting or being answered. The Job returned can be cancelled (the client left)."""
        with self.counting:
            if self.waiting >= self.queue_size:
                raise Busy
            self.waiting += 1
        job = Job(character, ids, max_tokens, dict(temperature=temperature, top_p=top_p, stop=stop, seed=seed), emit)
        self.jobs.put(job)
        return job

    @contextlib.contextmanager
    def arriving(self):
        """Around reading a request up to its submit(): an idle worker waits for it (see _take_waiting)."""
        with self.counting:
            self.reading += 1
        try:
            yield
        finally:
            with self.counting:
                self.reading -= 1

    def prompt_ids(self, character: Character, messages: list[dict]) -> list[int]:
        """The request as the character's chat template renders it, its system prompt first when the
        request brings none."""
        rendered = character.tokenizer.apply_chat_template(with_system(messages, character.system_prompt),
                                                           tokenize=True, add_generation_prompt=True)
        return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            self.batch_sizes.append(len(batch))
            try:
                self._generate(batch)
            except Exception as exc:  # the requests' failure, told to them; the server goes on
                for job in batch:
                    if not job.finished:
                        self._finish(job, exc)

    def _finish(self, job: Job, last) -> None:
        """A request leaves the count of those waiting before it hears its Answer (or failure), so a client
        that asks again at once finds its room free."""
        with self.counting:
            self.waiting -= 1
        job.finished = True
        job.emit(last)

    def _next_batch(self) -> list[Job]:
        """The oldest waiting request and every other waiting one it can share a generate() call with (the
        same sampling settings; characters may differ), up to MAX_BATCH; the rest wait, in order. Requests
        cancelled while they waited are dropped."""
        while True:
            self._take_waiting()
            dropped = [job for job in self.pending if job.cancelled]
            if dropped:
                self.pending = collections.deque(job for job in self.pending if not job.cancelled)
                with self.counting:
                    self.waiting -= len(dropped)
            if self.pending:
                break
        first = self.pending.popleft()
        batch, rest = [first], collections.deque()
        while self.pending:
            job = self.pending.popleft()
            (batch if job.key == first.key and len(batch) < MAX_BATCH else rest).append(job)
        self.pending = rest
        return batch

    def _take_waiting(self) -> None:
        """Move the queued requests to `pending`; when there were none, wait for one, then for the others
        sent with it."""
        if not self.pending:
            self.pending.append(self.jobs.get())
            start = time.monotonic()
            while (waited := time.monotonic() - start) < GATHER or (self.reading and waited < GATHER_MORE):
                with contextlib.suppress(queue.Empty):
                    self.pending.append(self.jobs.get(timeout=0.001))
        while True:
            try:
                self.pending.append(self.jobs.get_nowait())
            except queue.Empty:
                return

    def _generate(self, batch: list[Job]) -> None:
        from transformers import StoppingCriteriaList

        settings, tokenizer = batch[0].settings, batch[0].character.tokenizer
        temperature = settings["temperature"]
        sample = temperature > 0 if temperature is not None else self.model.generation_config.do_sample
        config = decoding_config(Session(self.model, tokenizer, None, self.adapted, self.device), greedy=not sample,
                                 max_new_tokens=max(job.max_tokens for job in batch), do_sample=sample or None,
                                 temperature=temperature, top_p=settings["top_p"], stop_strings=settings["stop"])
        # Every row stops at its own character's end of turn (runs on one base share them, as a rule).
        stops = sorted(set(config.eos_token_id).union(*(stop_token_ids(config, job.character.tokenizer)
                                                        for job in batch[1:])))
        config.eos_token_id = stops
        if settings["seed"] is not None:
            torch.manual_seed(settings["seed"])
        width = max(len(job.ids) for job in batch)  # prompts padded on the left, as one batch
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(job.ids)) + job.ids for job in batch],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(job.ids)) + [1] * len(job.ids) for job in batch], device=self.device)
        extra = {"adapter_names": [job.character.adapter or BASE_ADAPTER for job in batch]} if self.adapted else {}
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=tokenizer,
                streamer=_Pieces(batch, set(stops)), stopping_criteria=StoppingCriteriaList([_RowLimits(width, batch)]),
                **extra)
        for row, job in enumerate(batch):
            new = output[row, width:width + job.max_tokens].tolist()
            end = next((i for i, token in enumerate(new) if token in stops), None)
            finish = "stop" if end is not None or len(new) < job.max_tokens else "length"
            self._finish(job, Answer(finish, len(job.ids), len(new) if end is None else end))


MAX_BATCH = 32  # requests in one generate() call
# Seconds an idle worker waits after a request for others sent with it: a browser's second request of a
# pair arrives 1-3 ms after the first is read on an idle machine, but once more than 10 ms after it on a busy
# 2-core one (the page's two panes then decoded apart); a reply takes hundreds of decoding steps.
GATHER = 0.02
GATHER_MORE = 0.05  # the most it waits while requests are still being read


def open_runs(runs: list[tuple[str | None, str]], base_model: str | None) -> list[tuple]:
    """(model id, location, Run) for each (name or None, location) that serve.parse_runs gives, checked servable
    by one process: the id of a run is NAME, else its folder's name."""
    opened = [(name or Path(location).resolve().name, location, open_run(location, base_model))
              for name, location in runs]
    check_servable(opened)
    return opened


def base_id(base: str) -> str:
    """The model id of the base: its folder's name, or its hub id."""
    return Path(base).name if Path(base).exists() else base


def check_servable(opened: list) -> None:
    """One process serves runs on one base, or one whole model: anything else is a RunError of one line."""
    adapted = [(location, run) for _, location, run in opened if run.adapter]
    if adapted and len(adapted) < len(opened):
        plain = next(location for _, location, run in opened if not run.adapter)
        raise RunError(f"{plain}: a whole model cannot be served beside runs with adapters; serve it on its own")
    if not adapted and len(opened) > 1:
        raise RunError("several whole models: serve one at a time (runs with adapters share one base)")
    if len({run.base for _, run in adapted}) > 1:
        which = "; ".join(f"{location}: {run.base}" for location, run in adapted)
        raise RunError(f"the runs were trained on different bases ({which}); serve each base on its own, or "
                       "pass --base-model when they are copies of one")
    names = [name for name, _, _ in opened]
    if len(set(names)) < len(names):
        raise RunError(f"two runs are both named {max(names, key=names.count)}; name them: NAME=RUN")


@dataclass
class Job:
    character: Character
    ids: list[int]
    max_tokens: int
    settings: dict
    emit: object  # called with each piece of text, then the Answer
    cancelled: bool = False  # set when the client has gone: its row stops at the next step
    finished: bool = False  # its Answer (or failure) has been sent

    @property
    def key(self) -> tuple:
        """Requests batch together when they sample alike; a seeded one samples alone, to be reproducible."""
        s = self.settings
        return (s["temperature"], s["top_p"], tuple(s["stop"] or ()), s["seed"] if s["seed"] is None else id(self))


class _RowLimits:
    """Each row of a batch ends at its own request's max_tokens (generate's max_new_tokens is the largest)."""

    def __init__(self, width: int, batch: list[Job]):
        self.width, self.limits = width, batch

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        made = input_ids.shape[1] - self.width
        return torch.tensor([made >= job.max_tokens or job.cancelled for job in self.limits], device=input_ids.device)


class _Pieces:
    """A generate() streamer for a batch: each row's new text, decoded as it grows, goes to its request's
    queue (a piece ending inside a multi-byte character waits for the rest of it)."""

    def __init__(self, batch: list[Job], stops: set[int]):
        self.batch, self.stops, self.prompt_seen = batch, stops, False
        self.tokens: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.done = [False] * len(batch)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            job = self.batch[row]
            if self.done[row] or job.cancelled or token in self.stops or len(self.tokens[row]) >= job.max_tokens:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = job.character.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            piece, self.sent[row] = text[len(self.sent[row]):], text
            if piece:
                job.emit(piece)

    def end(self) -> None:
        pass
