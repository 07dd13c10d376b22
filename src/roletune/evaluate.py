"""`roletune eval`: the base model and the tuned model on held-out rows (or a given file).

Per model: loss and perplexity on the reference reply tokens, and on greedy replies BLEU-4,
ROUGE-L (characters for Chinese, words for space-separated text), distinct-1/2, mean reply
length, and the share of replies that stopped at end-of-turn; then the persona score (persona/):
whether identity probes are answered in character, and adversarial prompts resisted. Written to
eval.json and eval.md.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq

from roletune import metrics, persona, run_dir
from roletune.card import write_run_card
from roletune.config import Config, DataConfig, PersonaConfig
from roletune.data import load_conversations
from roletune.data.tokenize import IGNORE_INDEX, Example, tokenize_all
from roletune.decoding import Session, answer_all, decoding_config, load_session
from roletune.errors import DataError, RunError
from roletune.persona.detect import language

ROWS = [("loss", "reply loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"), ("bleu4", "BLEU-4", "{:.2f}"),
        ("rouge_l", "ROUGE-L", "{:.2f}"), ("distinct_1", "distinct-1", "{:.3f}"), ("distinct_2", "distinct-2", "{:.3f}"),
        ("mean_length", "mean reply length", "{:.1f}"), ("stop_rate", "stopped at end-of-turn", "{:.0%}")]


def evaluate(location: str, *, data: str | None = None, n: int | None = None, device: str = "auto",
             max_new_tokens: int | None = None, batch_size: int = 16, out: str | None = None, overwrite: bool = False,
             cuda_graphs: bool = False, base_model: str | None = None, judge: str | None = None,
             judge_model: str | None = None, echo=print) -> dict:
    if bool(judge) != bool(judge_model):
        raise RunError("--judge URL and --judge-model NAME go together")
    run = run_dir.open_run(location, base_model)
    if not run.adapter:
        raise RunError(f"{location}: eval compares a tuned model with its base; this is a plain model")
    target = Path(out or location)
    if (target / "eval.json").exists() and not overwrite:
        raise RunError(f"{target / 'eval.json'}: exists; pass --overwrite or --out DIR")
    conversations = load_rows(location, run, data)[:n or None]
    max_new_tokens = max_new_tokens or run_dir.reply_cap(location, 256)
    cfg = _run_config(location)
    max_length = cfg.data.max_length if cfg else 4096  # a bare adapter folder records no length
    wanted = cfg.eval.persona if cfg else PersonaConfig()
    session = load_session(location, device=device, base_model=base_model, cuda_graphs=cuda_graphs, echo=echo)
    config = decoding_config(session, greedy=True, max_new_tokens=max_new_tokens)
    character_language = language([c[-1].content for c in conversations])
    character, others, voice_prompts, voice_found, recorded = _voice_data(cfg, conversations)
    names, names_from = persona.character_names(wanted.names, recorded, session.system_prompt)
    models, personas = {}, {}
    for name in ("base", "tuned"):
        switch = session.model.disable_adapter() if name == "base" else contextlib.nullcontext()
        with switch:
            models[name] = score(session, conversations, config, batch_size, max_length, name)
            personas[name] = persona.score(session, config, names=names, character_language=character_language,
                                           probes=wanted.probes, break_prompts=wanted.break_prompts,
                                           batch_size=batch_size)
            if name == "base" and voice_prompts:  # the base's own voice, a negative for the classifier
                others += [r.text for r in answer_all(session, voice_prompts, config, batch_size)]
    voice_found, scores = _voice(character, others, models, voice_found)
    for name, value in scores.items():
        personas[name]["voice_score"] = value
    target.mkdir(parents=True, exist_ok=True)
    judged = _judge(judge, judge_model, session.system_prompt, target, conversations, models, personas,
                    echo) if judge else None
    report = {"run": str(location), "data": data or str(Path(location) / run_dir.HELDOUT_NAME),
              "rows": len(conversations), "decoding": {"greedy": True, "max_new_tokens": max_new_tokens},
              "models": models,
              "persona": {"names": names, "names_from": names_from, "language": character_language,
                          "voice": voice_found, **({"judge": judged} if judged else {}), **personas,
                          "difference": {key: _difference(personas, key) for key, _ in PERSONA_KEYS
                                         if key != "judge_score" or judged}}}
    table = markdown_table(models)
    persona_table = persona_markdown(report["persona"])
    (target / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    (target / "eval.md").write_text(f"# eval of {location} on {report['rows']} rows\n\n{table}\n\n{persona_table}\n",
                                    encoding="utf-8")
    echo(table)
    echo(persona_table)
    echo(f"wrote {target / 'eval.json'} and {target / 'eval.md'}")
    if target.resolve() == Path(location).resolve() and (target / run_dir.CONFIG_NAME).is_file():
        write_run_card(target)  # the run's README.md gains the table
    return report


def load_rows(location: str, run: run_dir.Run, data: str | None) -> list:
    if data is None:
        return run_dir.read_heldout(location)
    return load_conversations(DataConfig(path=data, system_prompt=run.system_prompt))


def score(session: Session, conversations: list, config, batch_size: int, max_length: int, name: str) -> dict:
    """Every metric for the model as it is now (adapter on or off)."""
    examples, _ = tokenize_all(conversations, session.tokenizer, max_length, "last")
    loss = reply_loss(session, examples, batch_size)
    prompts = [[m.as_dict() for m in c[:-1]] for c in conversations]
    references = [c[-1].content for c in conversations]
    with tqdm(total=len(prompts), desc=f"generating ({name})", file=sys.stderr) as bar:
        replies = answer_all(session, prompts, config, batch_size, on_batch=lambda _, done: bar.update(len(done)))
    texts = [r.text for r in replies]
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "bleu4": metrics.bleu4(texts, references),
        "rouge_l": metrics.rouge_l(texts, references),
        "distinct_1": metrics.distinct_n(texts, 1),
        "distinct_2": metrics.distinct_n(texts, 2),
        "mean_length": metrics.mean_length(texts),
        "stop_rate": sum(r.stopped for r in replies) / max(len(replies), 1),
        "replies": [{"reply": t, "reference": ref, "stopped": r.stopped}
                    for t, ref, r in zip(texts, references, replies)],
    }


def reply_loss(session: Session, examples: list[Example], batch_size: int) -> float:
    """Mean cross-entropy per reference reply token (the tokens training would have trained)."""
    collator = DataCollatorForSeq2Seq(session.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collator([e.as_features() for e in examples[start:start + batch_size]]).to(session.device)
        with torch.inference_mode():
            logits = session.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def markdown_table(models: dict) -> str:
    lines = ["| metric | base | tuned |", "| --- | ---: | ---: |"]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | {fmt.format(models['base'][key])} | {fmt.format(models['tuned'][key])} |")
    return "\n".join(lines)


PERSONA_KEYS = [("identity_rate", "answers identity probes in character"),
                ("break_rate", "leaves the character when pushed"),
                ("voice_score", "sounds like the character's own lines"),
                ("judge_score", "the judge's rating of the replies")]


def persona_markdown(found: dict) -> str:
    """The persona score as a table, the difference in percentage points, and whose names were looked for."""
    def cell(value):
        return "n/a" if value is None else f"{value:.0%}"

    lines = [f"Persona: {len(found['tuned']['identity'])} identity probes, {len(found['tuned']['breaks'])} "
             f"prompts pushing out of character; names {', '.join(found['names']) or 'none'} "
             f"(from {found['names_from']}).", "", "| persona | base | tuned | difference |",
             "| --- | ---: | ---: | ---: |"]
    for key, label in PERSONA_KEYS:
        if key == "judge_score" and "judge" not in found:
            continue
        change = found["difference"][key]
        shown = "n/a" if change is None else f"{change * 100:+.0f} pts"
        lines.append(f"| {label} | {cell(found['base'].get(key))} | {cell(found['tuned'].get(key))} | {shown} |")
    voice = found["voice"]
    lines += ["", f"Voice: {voice['skipped']}." if "skipped" in voice else
              f"Voice: a character n-gram classifier of {voice['character_lines']} of the character's lines against "
              f"{voice['other_lines']} others (other speakers', and the base's replies to training prompts), "
              f"{voice['cv_accuracy']:.0%} accurate in cross-validation (50%: it cannot tell them apart)."]
    judge = found.get("judge")
    if judge:
        lines += ["", f"Judge: {judge['model']} at {judge['url']}: {judge['error']}." if "error" in judge else
                  f"Judge: {judge['model']} at {judge['url']} rated {judge['parsed']} replies 1-5 (shown as "
                  f"(score-1)/4); {judge['unparsed']} answers had no score; {judge['cached']} came from its cache."]
    return "\n".join(lines)


def _difference(personas: dict, key: str) -> float | None:
    base, tuned = personas["base"].get(key), personas["tuned"].get(key)
    return None if base is None or tuned is None else tuned - base


def _voice_data(cfg: Config | None, evaluated: list) -> tuple[list[str], list[str], list, dict, list[str]]:
    """The voice classifier's lines from the run's training data, or why there are none; and the character
    names the data records."""
    if cfg is None:
        return [], [], [], {"skipped": "not scored, since a bare adapter folder records no training data"}, []
    recorded = Counter()
    try:
        training = load_conversations(cfg.data, names=recorded)
    except (DataError, OSError) as error:
        return [], [], [], {"skipped": f"not scored, since the training data could not be read ({error})"}, []
    return (*persona.voice_data(training, evaluated), {}, [name for name, _ in recorded.most_common()])


def _voice(character: list[str], others: list[str], models: dict, found: dict) -> tuple[dict, dict]:
    if "skipped" in found:
        return found, {name: None for name in models}
    try:
        return persona.voice_scores(character, others, {name: [r["reply"] for r in m["replies"]]
                                                         for name, m in models.items()})
    except ValueError as error:  # too few lines on a side
        return {"skipped": f"not scored: {error}"}, {name: None for name in models}


def _judge(url: str, model: str, character: str | None, target: Path, conversations: list, models: dict,
           personas: dict, echo) -> dict:
    """Each model's held-out replies rated by the judge; its counts, or the error that stopped it (the eval
    stands without it)."""
    from roletune.persona.judge import CACHE_NAME, Judge
    from roletune.serve.client import EndpointError

    judge = Judge(url, model, character, target / CACHE_NAME)
    prompts = [c[-2].content if len(c) >= 2 else "" for c in conversations]
    found = {"url": url, "model": model, "cache": str(target / CACHE_NAME), "parsed": 0, "unparsed": 0, "cached": 0}
    try:
        for name in ("base", "tuned"):
            rated = judge.rate(list(zip(prompts, [r["reply"] for r in models[name]["replies"]])))
            personas[name]["judge_score"], personas[name]["judge_scores"] = rated["judge_score"], rated["scores"]
            for count in ("parsed", "unparsed", "cached"):
                found[count] += rated[count]
    except EndpointError as error:
        echo(f"the judge was not heard, and the eval goes on without it: {error}")
        return {**found, "error": str(error)}
    return found


def _run_config(location: str) -> Config | None:
    try:
        return run_dir.read_config(location)
    except RunError:  # a bare adapter folder: no recorded config
        return None
