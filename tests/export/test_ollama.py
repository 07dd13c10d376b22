"""The Modelfile's text: what a run's persona, template and generation config become."""
from roletune.export.ollama import CHATML, is_chatml, modelfile


def test_a_sampling_chatml_model_gets_its_template_persona_stop_and_settings():
    text = modelfile("./zhen-q8_0.gguf", system="现在你要扮演皇帝身边的女人--甄嬛", chatml=True, stops=["<|im_end|>"],
                     generation={"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                 "repetition_penalty": 1.05})
    assert text == (f'FROM ./zhen-q8_0.gguf\n\nTEMPLATE """{CHATML}"""\n\n'
                    'SYSTEM """现在你要扮演皇帝身边的女人--甄嬛"""\n\nPARAMETER stop "<|im_end|>"\n'
                    "PARAMETER temperature 0.7\nPARAMETER top_p 0.8\nPARAMETER top_k 20\n"
                    "PARAMETER repeat_penalty 1.05\n")


def test_a_greedy_model_without_persona_or_chatml_leaves_the_template_to_the_gguf():
    text = modelfile("./m.gguf", system=None, chatml=False, stops=["</s>"], generation={"do_sample": False})
    assert text == 'FROM ./m.gguf\n\nPARAMETER stop "</s>"\nPARAMETER temperature 0\n'


def test_chatml_is_told_from_other_templates(qwen_tokenizer):
    import copy

    assert is_chatml(qwen_tokenizer)
    other = copy.deepcopy(qwen_tokenizer)  # the fixture is shared
    other.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    assert not is_chatml(other) and is_chatml(qwen_tokenizer)


def test_an_adapter_is_applied_to_the_base_named_by_from():
    text = modelfile("/models/qwen2.5-7b-instruct-f16.gguf", adapter="./zhen-lora-f16.gguf", system="甄嬛",
                     chatml=True, stops=["<|im_end|>"], generation={"do_sample": False})
    assert text.startswith('FROM /models/qwen2.5-7b-instruct-f16.gguf\nADAPTER ./zhen-lora-f16.gguf\n\nTEMPLATE """')
    assert text.endswith('SYSTEM """甄嬛"""\n\nPARAMETER stop "<|im_end|>"\nPARAMETER temperature 0\n')
