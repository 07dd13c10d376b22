"""roletune export: a demo run through llama.cpp's own converter, read back with transformers' GGUF reader,
and its Ollama Modelfile's template rendered by Go's text/template (the engine Ollama's templates run on)."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import LIGHTHOUSE_SYSTEM, ROOT
from roletune import decoding
from roletune.errors import RunError

QUESTION = "第3个问题：今天海上风大吗？"
CONVERTER = ROOT / ".cache" / "llama.cpp"  # make fetches it (python -m roletune.export.llama_cpp)


@pytest.fixture
def converter(monkeypatch):
    if not (CONVERTER / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's converter is not in .cache/llama.cpp: make fetches it")
    monkeypatch.setenv("ROLETUNE_LLAMA_CPP", str(CONVERTER))
    return CONVERTER


def greedy(model, tokenizer) -> str:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=24, eos_token_id=tokenizer.convert_tokens_to_ids(
            "<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


pytestmark = [pytest.mark.slow, pytest.mark.export]  # the converter runs in a process of its own


def test_a_q8_0_export_carries_the_persona_and_passes_its_logit_check(converter, trained_run, tmp_path):
    from roletune.export import export
    from roletune.export.check import chat_template

    written = export(str(trained_run), str(tmp_path / "out"), quant="q8_0", device="cpu", check="logits",
                     echo=lambda *_: None)
    assert written == tmp_path / "out" / "run-q8_0.gguf" and sorted(p.name for p in written.parent.iterdir()) == \
        ["roletune_export.json", "run-q8_0.gguf"]  # the merged weights are gone
    record = json.loads((written.parent / "roletune_export.json").read_text())
    assert record["quant"] == "q8_0" and record["checks"]["logits"]["mean_kl"] < 0.02
    assert LIGHTHOUSE_SYSTEM in chat_template(written)  # the persona opens a conversation that brings none


def test_for_ollama_the_gguf_answers_as_the_run_and_the_modelfile_renders_as_training_did(converter, trained_run,
                                                                                          tmp_path):
    """transformers' GGUF reader reads the file back (half a minute: gguf-py parses the 151,665-token vocabulary
    in Python); Go's text/template renders the TEMPLATE as Ollama would, and it must be the run's own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roletune.export import export
    from roletune.export.check import chat_template

    lines = []
    export(str(trained_run), str(tmp_path / "out"), to="ollama", quant="f16", device="cpu", check="none",
           echo=lines.append)
    written = tmp_path / "out" / "run-f16.gguf"
    session = decoding.load_session(str(trained_run), device="cpu")
    (want,) = decoding.answer_batch(session, [[{"role": "user", "content": QUESTION}]],
                                    decoding.decoding_config(session, greedy=True, max_new_tokens=24))
    model = AutoModelForCausalLM.from_pretrained(written.parent, gguf_file=written.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(trained_run)
    tokenizer.chat_template = chat_template(written)
    assert greedy(model, tokenizer) == want.text and "灯塔照常亮着。" in want.text

    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./run-f16.gguf\n")
    assert f'SYSTEM """{LIGHTHOUSE_SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert lines[-1] == f"ollama create run -f {tmp_path / 'out' / 'Modelfile'}"
    template = text[text.index('TEMPLATE """') + 12:text.index('"""', text.index('TEMPLATE """') + 12)]
    go = os.environ.get("ROLETUNE_GO") or shutil.which("go")
    if go is None or not os.access(go, os.X_OK):
        assert not os.environ.get("ROLETUNE_GO"), "make test-slow installs Go (Debian's golang-go)"
        pytest.skip("no Go to render the template with (Debian: apt-get install golang-go)")
    conversations = [
        [{"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "风有3级。"},
         {"role": "user", "content": "再说一遍"}],
    ]
    for messages in conversations:
        # Ollama hands the template the Modelfile's SYSTEM as .System when the request brings none.
        expected = tokenizer.apply_chat_template(decoding.with_system(messages, LIGHTHOUSE_SYSTEM), tokenize=False,
                                                 add_generation_prompt=True)
        assert render_with_go(go, template, LIGHTHOUSE_SYSTEM, messages, tmp_path) == expected


def render_with_go(go, template: str, system: str, messages: list[dict], folder) -> str:
    program = folder / "render.go"
    program.write_text('''package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Template string    `json:"template"`
		System   string    `json:"system"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	parsed := template.Must(template.New("modelfile").Parse(input.Template))
	data := map[string]any{"System": input.System, "Messages": input.Messages, "Prompt": "", "Response": ""}
	if err := parsed.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
''')
    given = json.dumps({"template": template, "system": system, "messages": messages})
    done = subprocess.run([go, "run", str(program)], input=given, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GO111MODULE": "off"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_what_cannot_be_exported_is_one_line_and_nothing_is_written(converter, trained_run, tiny_model, tmp_path,
                                                                     monkeypatch):
    from roletune.export import export

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(RunError, match="taken: exists; choose a new --out"):
        export(str(trained_run), str(taken), device="cpu", echo=lambda *_: None)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    odd = tmp_path / "odd-base"
    shutil.copytree(tiny_model, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NopeForCausalLM"]}))
    with pytest.raises(RunError, match=r"^NopeForCausalLM: llama.cpp's converter \(llama-cpp-python .*\) cannot"):
        export(str(trained_run), str(tmp_path / "a"), base_model=str(odd), device="cpu", echo=lambda *_: None)

    import roletune.export as exporting
    from roletune.export import llama_cpp

    monkeypatch.setattr(exporting.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 10**6))
    with pytest.raises(RunError, match=r"0.0 GiB free, and the export needs about 0.\d GiB"):
        export(str(trained_run), str(tmp_path / "b"), device="cpu", echo=lambda *_: None)
    monkeypatch.undo()
    monkeypatch.setenv("ROLETUNE_LLAMA_CPP", str(converter))

    def interrupted(*args):
        raise KeyboardInterrupt  # as Ctrl-C during the conversion

    monkeypatch.setattr(llama_cpp, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(str(trained_run), str(tmp_path / "c"), device="cpu", echo=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd-base", "taken"]  # nothing half-written
