"""What export needs beyond roletune's own install, named in one line before anything runs."""
import pytest

from roletune.errors import RunError
from roletune.export import llama_cpp


def test_missing_tools_are_named_with_what_to_install(monkeypatch):
    present = {"sentencepiece", "gguf"}
    monkeypatch.setattr(llama_cpp, "_importable", lambda name: name in present)
    llama_cpp.check_tools(runtime=False)  # f16, bf16 and q8_0 unchecked need the converter's imports alone
    with pytest.raises(RunError, match=r"^export needs llama-cpp-python: pip install 'roletune\[gguf\]' \(pip"):
        llama_cpp.check_tools(runtime=True)
    present.clear()
    with pytest.raises(RunError, match=r"^export needs sentencepiece and gguf and llama-cpp-python: pip install"):
        llama_cpp.check_tools(runtime=True)
