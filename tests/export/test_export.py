"""roletune export: demo runs through llama.cpp's own converter and quantizer, read back with transformers' GGUF
reader and answered by llama.cpp's own runtime, and an Ollama Modelfile's template rendered by Go's
text/template (the engine Ollama's templates run on)."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import LIGHTHOUSE_SYSTEM, ROOT, train_lighthouse
from roletune import decoding
from roletune.errors import RunError

QUESTION = "第3个问题：今天海上风大吗？"
CONVERTER = ROOT / ".cache" / "llama.cpp"  # make fetches it (python -m roletune.export.llama_cpp fetch)


@pytest.fixture
def converter(monkeypatch):
    if not (CONVERTER / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's converter is not in .cache/llama.cpp: make fetches it")
    monkeypatch.setenv("ROLETUNE_LLAMA_CPP", str(CONVERTER))
    return CONVERTER


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, tiny_model):
    """The lighthouse run on a tiny model of hidden size 256: k-quants pack rows of 256 weights, and llama.cpp
    falls back to other types for narrower ones. Its sample prompt is the question it was trained on (~20 s)."""
    from roletune.demo.model import build_tiny_model

    folder = tmp_path_factory.mktemp("wide")
    base = build_tiny_model(folder / "base", tokenizer_dir=tiny_model, hidden_size=256, intermediate_size=512)
    return train_lighthouse(folder, base, eval={"sample_prompts": [QUESTION], "max_new_tokens": 24})


pytestmark = [pytest.mark.slow, pytest.mark.export]  # the converter runs in a process of its own


def test_q8_0_and_f16_exports_pass_their_logit_checks_and_carry_the_persona(converter, trained_run, tiny_model,
                                                                             tmp_path):
    from roletune.export import export
    from roletune.export.check import chat_template
    from roletune.merge import PROBES

    written = export(str(trained_run), str(tmp_path / "out"), quant="q8_0", device="cpu", check="logits",
                     echo=lambda *_: None)
    assert written == tmp_path / "out" / "run-q8_0.gguf" and sorted(p.name for p in written.parent.iterdir()) == \
        ["roletune_export.json", "run-q8_0.gguf"]  # the merged weights are gone
    record = json.loads((written.parent / "roletune_export.json").read_text())
    assert record["quant"] == "q8_0" and record["checks"]["logits"]["mean_kl"] < 0.02
    replies = record["checks"]["replies"]  # the run has no sample prompts: merge's probes
    assert replies["prompts"] == PROBES and replies["end_of_turn"] == "<|im_end|>" and len(replies["replies"]) == 3
    assert LIGHTHOUSE_SYSTEM in chat_template(written)  # the persona opens a conversation that brings none

    plain = export(str(tiny_model), str(tmp_path / "plain"), quant="f16", check="logits", echo=lambda *_: None)
    logits = json.loads((plain.parent / "roletune_export.json").read_text())["checks"]["logits"]
    assert 0 < logits["max_abs_logit_diff"] and logits["same_next_token"] > 0.95  # f16 rounds the fp32 weights


def test_a_q4_k_m_export_for_ollama_answers_as_the_run_in_llama_cpp_and_renders_as_training_did(converter, wide_run,
                                                                                               tmp_path):
    """llama.cpp's quantizer makes the file and llama.cpp's runtime answers the run's sample prompt with the run's
    own greedy answer, ending at <|im_end|>; Go's text/template renders the Modelfile's TEMPLATE as Ollama would,
    and it must be the run's own."""
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoTokenizer

    from roletune.export import export
    from roletune.export.check import chat_template

    lines = []
    export(str(wide_run), str(tmp_path / "out"), to="ollama", quant="q4_k_m", device="cpu", check="replies",
           echo=lines.append)
    written = tmp_path / "out" / "run-q4_k_m.gguf"
    assert sorted(p.name for p in written.parent.iterdir()) == ["Modelfile", "roletune_export.json", written.name]
    reader = GGUFReader(written)
    assert reader.get_field("general.file_type").contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    matrices = {t.name: t.tensor_type for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    kinds = set(matrices.values())
    assert GGMLQuantizationType.Q4_K in kinds and kinds <= {GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K}

    session = decoding.load_session(str(wide_run), device="cpu")
    (want,) = decoding.answer_batch(session, [[{"role": "user", "content": QUESTION}]],
                                    decoding.decoding_config(session, greedy=True, max_new_tokens=24))
    replies = json.loads((tmp_path / "out" / "roletune_export.json").read_text())["checks"]["replies"]
    assert replies["prompts"] == [QUESTION] and "灯塔照常亮着。" in want.text
    assert replies["replies"] == replies["model_replies"] == [want.text]
    assert replies["same_reply"] == replies["stopped_at_end_of_turn"] == 1

    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./run-q4_k_m.gguf\n")
    assert f'SYSTEM """{LIGHTHOUSE_SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert lines[-1] == f"ollama create run -f {tmp_path / 'out' / 'Modelfile'}"
    template = text[text.index('TEMPLATE """') + 12:text.index('"""', text.index('TEMPLATE """') + 12)]
    go = os.environ.get("ROLETUNE_GO") or shutil.which("go")
    if go is None or not os.access(go, os.X_OK):
        assert not os.environ.get("ROLETUNE_GO"), "make test-slow installs Go (Debian's golang-go)"
        pytest.skip("no Go to render the template with (Debian: apt-get install golang-go)")
    tokenizer = AutoTokenizer.from_pretrained(wide_run)
    tokenizer.chat_template = chat_template(written)
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


def test_the_adapter_alone_applied_by_llama_cpp_to_the_base_gguf_answers_as_the_run(converter, wide_run, tmp_path):
    """One base GGUF, many characters: the base exported once, then the adapter alone; llama.cpp's runtime
    applies it and answers the run's sample prompt with the run's own answer, ending at <|im_end|>."""
    from gguf import GGUFReader

    from roletune.export import export

    base = export(str(wide_run.parent / "base"), str(tmp_path / "base"), quant="f16", check="none",
                  echo=lambda *_: None)  # a plain model folder, as it is
    lines = []
    written = export(str(wide_run), str(tmp_path / "out"), to="ollama", adapter_only=True, base_gguf=str(base),
                     device="cpu", echo=lines.append)
    assert written == tmp_path / "out" / "run-lora-f16.gguf"
    assert sorted(p.name for p in written.parent.iterdir()) == ["Modelfile", "roletune_export.json", written.name]
    assert written.stat().st_size < base.stat().st_size / 10
    assert GGUFReader(written).get_field("general.type").contents() == "adapter"

    session = decoding.load_session(str(wide_run), device="cpu")
    (want,) = decoding.answer_batch(session, [[{"role": "user", "content": QUESTION}]],
                                    decoding.decoding_config(session, greedy=True, max_new_tokens=24))
    record = json.loads((tmp_path / "out" / "roletune_export.json").read_text())
    assert record["checks"]["adapter"]["adapter.lora.alpha"] == 16.0 and record["base_gguf"] == str(base)
    replies = record["checks"]["replies"]
    assert replies["replies"] == replies["model_replies"] == [want.text] and "灯塔照常亮着。" in want.text
    assert replies["stopped_at_end_of_turn"] == 1

    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith(f"FROM {base}\nADAPTER ./run-lora-f16.gguf\n\nTEMPLATE")
    assert f'SYSTEM """{LIGHTHOUSE_SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert lines[-1] == f"ollama create run -f {tmp_path / 'out' / 'Modelfile'}"


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


def test_what_cannot_be_exported_is_one_line_and_nothing_is_written(converter, trained_run, wide_run, tiny_model,
                                                                     tmp_path, monkeypatch):
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

    with pytest.raises(RunError, match=r"^q3_k: not a quantization export writes \(f16, bf16, q8_0, q6_k, q5_k_m"):
        export(str(trained_run), str(tmp_path / "d"), quant="q3_k", device="cpu", echo=lambda *_: None)

    with pytest.raises(RunError, match=r"odd-base: --adapter-only exports a run's adapter, and this is a whole model"):
        export(str(odd), str(tmp_path / "f"), adapter_only=True, echo=lambda *_: None)
    with pytest.raises(RunError, match=r"^q4_k_m: an adapter is written as f16, bf16, q8_0 \(k-quants are for whole"):
        export(str(trained_run), str(tmp_path / "g"), adapter_only=True, quant="q4_k_m", echo=lambda *_: None)
    with pytest.raises(RunError, match=r"^--adapter-only --to ollama needs --base-gguf FILE, the base model as a GGUF"):
        export(str(trained_run), str(tmp_path / "h"), adapter_only=True, to="ollama", echo=lambda *_: None)

    from roletune.export import check as checking

    # A GGUF whose replies end on another end-of-generation token than the template's fails its check: here the
    # check is told the turn ends with <|endoftext|>, and llama.cpp ends the run's answer at <|im_end|>.
    monkeypatch.setattr(checking, "_end_of_turn", lambda tokenizer: tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    with pytest.raises(RunError, match=r"llama.cpp ended a reply with <\|im_end\|>, not <\|endoftext\|>; nothing"):
        export(str(wide_run), str(tmp_path / "e"), quant="q8_0", check="replies", device="cpu", echo=lambda *_: None)

    def interrupted(*args):
        raise KeyboardInterrupt  # as Ctrl-C during the conversion

    monkeypatch.setattr(llama_cpp, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(str(trained_run), str(tmp_path / "c"), device="cpu", echo=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd-base", "taken"]  # nothing half-written
