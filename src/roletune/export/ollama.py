"""An Ollama Modelfile for an exported GGUF: the run's template, persona, stop token and sampling settings.

A Modelfile whose template or stop tokens differ from training is the top complaint about Ollama exports
(the model never stops, or drops its persona), so the template is written only when the model's own chat
template renders conversations exactly as ChatML does (Qwen's, checked on a sample); for any other
template Ollama takes the one the GGUF carries.
"""
from __future__ import annotations

import json
from pathlib import Path

from roletune.errors import RunError

# ChatML in Ollama's Go template language, shaped as Ollama's own qwen2.5 template less its tools: the system
# message (Ollama puts the request's, else SYSTEM, in .System) and each turn between <|im_start|>ROLE and
# <|im_end|>, the assistant's turn opened for the reply; the second branch serves /api/generate's .Prompt.
CHATML = '''{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}'''
SAMPLE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
          {"role": "user", "content": "U2"}]
CHATML_SAMPLE = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
                 "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n")
# generation_config.json's sampling settings, by their Ollama PARAMETER names
PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def is_chatml(tokenizer) -> bool:
    return tokenizer.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True) == CHATML_SAMPLE


def modelfile(source: str, *, adapter: str | None = None, system: str | None, chatml: bool, stops: list[str],
              generation: dict) -> str:
    """FROM `source` (a GGUF, ./NAME beside the Modelfile), with ADAPTER `adapter` (a LoRA GGUF) applied to it."""
    lines = [f"FROM {source}", *([f"ADAPTER {adapter}"] if adapter else []), ""]
    if chatml:
        lines += [f'TEMPLATE """{CHATML}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    if generation.get("do_sample", False):
        lines += [f"PARAMETER {name} {generation[key]}" for key, name in PARAMETERS.items()
                  if generation.get(key) is not None]
    else:  # a greedy model: Ollama samples at 0.8 unless told
        lines += ["PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def write_modelfile(work: Path, tokenizer_from: str | Path, generation_from: str | Path, system: str | None,
                    source: str, adapter: str | None, echo) -> None:
    """work/Modelfile: FROM `source` (and ADAPTER `adapter`), the template when it is ChatML, the persona, the
    stop token and the generation config's sampling settings."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    if system and '"""' in system:
        raise RunError('the system prompt holds """, which a Modelfile cannot quote; nothing was written')
    chatml = is_chatml(tokenizer)
    if not chatml:
        echo("the chat template is not ChatML: the Modelfile leaves TEMPLATE to the one the GGUF carries")
    try:
        generation = GenerationConfig.from_pretrained(generation_from).to_dict()
    except OSError:
        generation = {}
    stops = ["<|im_end|>"] if chatml else [tokenizer.eos_token]
    (work / "Modelfile").write_text(modelfile(source, adapter=adapter, system=system, chatml=chatml, stops=stops,
                                              generation=generation), encoding="utf-8")
