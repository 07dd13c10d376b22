"""Training progress: roletune's lines in place of Trainer's dicts of quoted numbers."""
from types import SimpleNamespace

from roletune import train
from roletune.config import load_config
from roletune.training.progress import ProgressLines


def test_a_training_run_prints_lines_not_dicts(config_file, capsys):
    cfg = load_config(config_file(data={"eval_size": 2}, train={"max_steps": 2, "logging_steps": 1}))
    summary = train.run(cfg).summary
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 1/2  loss ") and " lr " in lines[0] and " grad norm " in lines[0]
    assert " tokens/s" in lines[0] and lines[0].endswith(" left")
    assert any(line.startswith("step 2/2  eval loss ") for line in lines)
    assert "{'" not in out and "'loss'" not in out
    assert f"final_train_loss: {summary['final_train_loss']:.4f}\n" in out


def test_a_line_says_what_the_log_holds_and_how_long_is_left(monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr("roletune.training.progress.time.perf_counter", lambda: next(clock))
    progress = ProgressLines(echo=lambda *_: None, bar=False)
    state = SimpleNamespace(global_step=0, max_steps=100, num_input_tokens_seen=0, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    state.global_step = 10
    line = progress.describe({"loss": 1.23456, "learning_rate": 2e-4, "grad_norm": 0.5, "epoch": 0.1,
                              "num_input_tokens_seen": 5000, "skipped_steps": 1}, state)
    assert line == "step 10/100  loss 1.2346  lr 0.0002  grad norm 0.5  500 tokens/s  1m 30s left  skipped_steps 1"
