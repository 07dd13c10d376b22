import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from roletune import decoding
from roletune.cli import main
from roletune.merge import merge, probe_inputs

from conftest import LIGHTHOUSE_SYSTEM

QUESTION = "第3个问题：今天海上风大吗？"


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    merge(str(trained_run), str(out), dtype="fp32", device="cpu", echo=lambda *_: None)
    return out


@pytest.mark.slow
def test_merged_folder_is_a_plain_transformers_model(merged, trained_run):
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    trained_template = (trained_run / "chat_template.jinja").read_text(encoding="utf-8")
    assert tokenizer.chat_template == decoding.with_default_system(trained_template, LIGHTHOUSE_SYSTEM)
    assert 151645 in model.generation_config.eos_token_id
    assert (merged / "model.safetensors").is_file()
    record = json.loads((merged / "roletune_merge.json").read_text(encoding="utf-8"))
    assert record["dtype"] == "fp32" and record["max_abs_logit_diff"] < 1e-4
    assert not any(name.startswith(".") for name in (p.name for p in merged.parent.iterdir()))


def test_merged_logits_equal_adapter_logits(merged, trained_run):
    tuned = decoding.load_session(str(trained_run), device="cpu")
    plain = decoding.load_session(str(merged), device="cpu")
    assert plain.system_prompt == tuned.system_prompt and not plain.has_adapter
    inputs = probe_inputs(tuned)
    with torch.inference_mode():
        want, got = tuned.model(**inputs).logits, plain.model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert (want - got).abs()[mask].max().item() < 1e-4


def test_merged_weight_is_w_plus_scaled_b_a(merged, trained_run, tiny_model):
    adapter = load_file(trained_run / "adapter_model.safetensors")
    config = json.loads((trained_run / "adapter_config.json").read_text())
    base = load_file(tiny_model / "model.safetensors")
    result = load_file(merged / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj"
    a = adapter[f"base_model.model.{name}.lora_A.weight"]
    b = adapter[f"base_model.model.{name}.lora_B.weight"]
    expected = base[f"{name}.weight"] + (config["lora_alpha"] / config["r"]) * b @ a
    torch.testing.assert_close(result[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    assert not torch.equal(result[f"{name}.weight"], base[f"{name}.weight"])


@pytest.mark.slow
def test_merged_model_answers_like_the_adapter(merged, trained_run):
    prompt = [[{"role": "user", "content": QUESTION}]]
    answers = []
    for location in (trained_run, merged):
        session = decoding.load_session(str(location), device="cpu")
        answers.append(decoding.answer_batch(session, prompt, decoding.decoding_config(session, greedy=True,
                                                                                        max_new_tokens=20))[0].text)
    assert answers[0] == answers[1]


def test_merge_refuses_a_non_empty_out_and_leaves_it_alone(trained_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(trained_run), "--out", str(out), "--device", "cpu"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_merge_failing_its_check_writes_nothing(trained_run, tmp_path, monkeypatch):
    import roletune.merge as merge_module
    from roletune.errors import RunError

    monkeypatch.setitem(merge_module.RELATIVE_TOLERANCE, "fp32", -1.0)  # no difference is small enough
    with pytest.raises(RunError, match="merge check failed"):
        merge(str(trained_run), str(tmp_path / "out"), dtype="fp32", device="cpu", echo=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_merge_needs_an_adapter(tiny_model, tmp_path, capsys):
    assert main(["merge", str(tiny_model), "--out", str(tmp_path / "m")]) == 1
    assert "no adapter to merge" in capsys.readouterr().err


def test_the_merged_template_opens_with_the_persona_and_generation_stops_at_end_of_turn(merged, trained_run):
    """A user of the merged folder renders prompts with its template alone: without a system message they
    get the run's persona, not Qwen's default; a system message of their own still wins."""
    from transformers import GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.startswith(f"<|im_start|>system\n{LIGHTHOUSE_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}")
    assert "Qwen" not in rendered
    trained = AutoTokenizer.from_pretrained(trained_run)
    conversation = [{"role": "system", "content": "另一个角色"}, {"role": "user", "content": QUESTION}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == \
        trained.apply_chat_template(conversation, tokenize=False)
    stops = GenerationConfig.from_pretrained(merged).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and tokenizer.eos_token_id in stops


def test_a_persona_with_quotes_and_template_syntax_stays_text():
    from roletune.decoding import with_default_system

    persona = '他说："别走。" \\ {{ name }} {% if %} 换行\n之后'
    template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    import jinja2

    rendered = jinja2.Environment().from_string(with_default_system(template, persona)).render(
        messages=[{"role": "user", "content": "hi"}])
    assert rendered == f"[system:{persona}][user:hi]"
    assert with_default_system(template, None) == template


def test_the_merged_folder_and_the_run_have_model_cards(merged, trained_run):
    for folder, library in ((trained_run, "peft"), (merged, "transformers")):
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert card.startswith("---\n") and f"library_name: {library}" in card, folder
        assert "More Information Needed" not in card
        assert f"> {LIGHTHOUSE_SYSTEM}" in card and "## Training" in card and "r=8, alpha=16" in card
        assert "## Sample answers" not in card  # the run answered no sample prompts (eval.samples needs held-out rows)
    assert "max length 64" in (trained_run / "README.md").read_text(encoding="utf-8")
    assert f"from_pretrained({str(merged)!r})" in (merged / "README.md").read_text(encoding="utf-8")
