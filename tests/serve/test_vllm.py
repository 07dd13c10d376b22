"""--engine vllm: the command roletune hands over to vLLM's server, built and checked on the CPU (vLLM itself
needs a GPU)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from roletune.errors import RunError
from roletune.serve.vllm import run_vllm, vllm_command


def test_the_command_serves_the_base_and_each_run_as_a_lora_module(trained_run, tiny_model, tmp_path):
    wide = tmp_path / "wide"
    shutil.copytree(trained_run, wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 12}))
    command = vllm_command([(None, str(trained_run)), ("zhen", str(wide))], port=8001, dtype="bf16")
    assert command[:8] == ["vllm", "serve", str(tiny_model), "--served-model-name", tiny_model.name, "--host",
                           "127.0.0.1", "--port"]
    assert command[8:11] == ["8001", "--dtype", "bfloat16"] and "--enable-lora" in command
    assert command[command.index("--lora-modules") + 1:command.index("--chat-template")] == \
        [f"run={trained_run.resolve()}", f"zhen={wide.resolve()}"]
    assert command[command.index("--max-loras") + 1] == "2"
    assert command[command.index("--max-lora-rank") + 1] == "16"  # the next rank vLLM accepts above 12
    assert command[command.index("--chat-template") + 1] == (trained_run / "chat_template.jinja").read_text()


def test_what_vllm_cannot_serve_is_refused_in_one_line(trained_run, tmp_path):
    with pytest.raises(RunError, match="quantizes to 4 bits"):
        vllm_command([(None, str(trained_run))], quantization="8bit")
    assert "--quantization bitsandbytes" in " ".join(vllm_command([(None, str(trained_run))], quantization="4bit"))
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(RunError, match="run and other were trained with different chat templates"):
        vllm_command([(None, str(trained_run)), (None, str(other))])
    with pytest.raises(RunError, match=r"vLLM is not installed here \(no `vllm-missing` on PATH\).*the command would "
                                       r"be: vllm-missing serve"):
        run_vllm(["vllm-missing", "serve", "base"])


@pytest.mark.slow  # a process launch
def test_serve_hands_its_process_to_vllm_with_the_key_in_the_environment(trained_run, tmp_path):
    """A stand-in `vllm` program records how it was started: its arguments, and the key out of them."""
    stand_in = tmp_path / "bin" / "vllm"
    stand_in.parent.mkdir()
    seen = tmp_path / "seen"
    stand_in.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"json.dump([sys.argv[1:], os.environ.get('VLLM_API_KEY')], open({str(seen)!r}, 'w'))\n")
    stand_in.chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "roletune", "serve", str(trained_run), "--engine", "vllm",
                           "--api-key", "sk-secret", "--port", "8123"], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    arguments, key = json.loads(seen.read_text())
    assert arguments == vllm_command([(None, str(trained_run))], port=8123)[1:]
    assert key == "sk-secret" and "sk-secret" not in " ".join(arguments) + done.stdout
    assert done.stdout.startswith("starting vLLM: vllm serve ")
