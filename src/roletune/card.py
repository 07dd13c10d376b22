"""Model cards: the README.md of a run folder and of a merged model, written from what the run folder
holds (roletune.yaml, train_summary.json, samples.jsonl, eval.md), in place of peft's blank template.

A card says what the model is (base, persona), how to use it with roletune and with plain
transformers, how it was trained, and what it measured. The front matter is the Hugging Face hub's,
so a folder pushed there as it is shows its base and library.
"""
from __future__ import annotations

import json
from pathlib import Path

from roletune import __version__, run_dir
from roletune.errors import RunError

CARD_NAME = "README.md"
PROBE = "你是谁？"


def write_run_card(run: str | Path) -> Path:
    """The card of a training run folder (its adapter)."""
    run = Path(run)
    cfg = run_dir.read_config(run)
    name = run.resolve().name
    system = cfg.data.system_prompt
    body = [
        _front_matter(cfg.model.path, "peft"),
        f"# {name}\n\nA LoRA adapter for {cfg.model.path}, trained with roletune {__version__}"
        f"{' to answer as the persona below' if system else ''}.",
        _persona(system, "The adapter learned the persona with this system prompt; keep it when you use it."),
        "## Use\n\n```bash\n"
        f"roletune chat {run}\nroletune compare {run} --prompt {PROBE}\nroletune merge {run} --out {run}-merged\n"
        "```\n\nWith transformers and peft:\n\n```python\n"
        "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(run)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(run)!r})\n"
        f"{_usage_code(system)}```",
        *_run_sections(run, cfg),
    ]
    return _write(run / CARD_NAME, body)


def write_merged_card(folder: Path, target: Path, run: str | Path, record: dict) -> Path:
    """The card of the merged model going to `target`, written into `folder` (where it is being assembled);
    `record` is what merge writes to roletune_merge.json."""
    system = record.get("system_prompt")
    body = [
        _front_matter(record["base"], "transformers"),
        f"# {target.name}\n\n{record['base']} with the LoRA adapter of {Path(record['adapter']).name} merged into "
        f"its weights ({record['dtype']}), by roletune {__version__}. Before writing, the merged logits were "
        f"checked against the adapter's: largest difference {record['max_abs_logit_diff']:.3g}.",
        _persona(system, "It is the chat template's default system prompt: a conversation without a system "
                         "message gets it, in transformers, vLLM or any server that applies the template."),
        "## Use\n\n```bash\n"
        f"roletune chat {target}\nvllm serve {target}\n"
        "```\n\nWith transformers:\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(target)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(target)!r})\n"
        f"{_usage_code(None)}```",
    ]
    try:
        body.extend(_run_sections(Path(run), run_dir.read_config(run)))
    except RunError:  # a bare adapter folder: no record of its training
        pass
    return _write(folder / CARD_NAME, body)


def _front_matter(base: str, library: str) -> str:
    hub_base = base if run_dir.looks_like_hub_id(base) and not base.startswith("modelscope:") else None
    lines = ["---", *([f"base_model: {hub_base}"] if hub_base else []), f"library_name: {library}",
             "pipeline_tag: text-generation", "tags:", "- roletune", "- lora", "- role-play", "---"]
    return "\n".join(lines)


def _persona(system: str | None, note: str) -> str:
    if not system:
        return "## Persona\n\nNo system prompt: the persona comes from the training conversations alone."
    quoted = "\n".join(f"> {line}" for line in system.splitlines())
    return f"## Persona\n\n{quoted}\n\n{note}"


def _usage_code(system: str | None) -> str:
    turns = ([f"    {{'role': 'system', 'content': {system!r}}},\n"] if system else []) + \
        [f"    {{'role': 'user', 'content': {PROBE!r}}},\n"]
    return ("messages = [\n" + "".join(turns) + "]\n"
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',\n"
            "                                       return_dict=True)\n"
            "reply = model.generate(**inputs, max_new_tokens=256)[0, inputs['input_ids'].shape[1]:]\n"
            "print(tokenizer.decode(reply, skip_special_tokens=True))\n")


def _run_sections(run: Path, cfg) -> list[str]:
    """Training, evaluation and sample answers, each as far as the run folder records it."""
    summary = _read_json(run / run_dir.SUMMARY_NAME) or {}
    t, lora = cfg.train, cfg.lora
    heldout = run / run_dir.HELDOUT_NAME
    held = sum(1 for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip()) \
        if heldout.is_file() else 0
    accumulated = summary.get("grad_accum", t.grad_accum)
    rows = [
        ("data", f"{cfg.data.path}{f' ({held} rows held out for evaluation)' if held else ''}"),
        ("LoRA", f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g} on {', '.join(lora.target_modules)}"),
        ("schedule", f"{f'{t.max_steps} steps' if t.max_steps else f'{t.epochs:g} epochs'}, lr {t.lr:g}, "
                     f"batch {t.batch_size} x {accumulated} accumulated, max length {cfg.data.max_length}, "
                     f"trained on: {cfg.data.train_on}"),
    ]
    if summary:
        rows.append(("run", f"{summary.get('optimizer_steps')} optimizer steps in {summary.get('wall_time_s')} s "
                            f"on {summary.get('device')}, peak memory {summary.get('peak_memory_gib')} GiB"))
        losses = [f"{name} {summary[key]:.4f}" for name, key in (("train", "final_train_loss"),
                                                                 ("eval", "final_eval_loss"))
                  if summary.get(key) is not None]
        if losses:
            rows.append(("final loss", ", ".join(losses)))
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {key} | {_cell(value)} |" for key, value in rows)])
    sections = [f"## Training\n\n{table}\n\nThe whole config is in {run_dir.CONFIG_NAME} beside the adapter."]
    evaluation = run / "eval.md"
    if evaluation.is_file():
        body = evaluation.read_text(encoding="utf-8").split("\n", 1)[-1].strip()  # eval.md less its title
        sections.append("## Evaluation\n\nThe base and the tuned model, greedy decoding (roletune eval):\n\n" + body)
    samples = _last_samples(run / "samples.jsonl")
    if samples:
        lines = [f"Greedy answers after the last epoch (step {samples[0]['step']}), beside the data's own reply:",
                 "", "| prompt | answer | reference |", "| --- | --- | --- |"]
        lines += [f"| {_cell(row['prompt'])} | {_cell(row['answer'])} | {_cell(row.get('reference') or '-')} |"
                  for row in samples]
        sections.append("## Sample answers\n\n" + "\n".join(lines))
    return sections


def _last_samples(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    last = max((row["step"] for row in rows), default=None)
    return [row for row in rows if row["step"] == last]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cell(text) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _write(target: Path, sections: list[str]) -> Path:
    run_dir.write_aside(target, "\n\n".join(sections) + "\n")
    return target
