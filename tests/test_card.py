"""Model cards: a run folder's README.md says what the adapter is, how it trained and what it answers, and
gains the eval table when the run is evaluated."""
from pathlib import Path

from roletune import train
from roletune.config import load_config
from roletune.evaluate import evaluate


def test_a_run_card_holds_the_recipe_the_losses_and_the_sample_answers_then_the_eval(config_file, write_json,
                                                                                    persona_rows):
    cfg = load_config(config_file(train={"max_steps": 4}, eval={"sample_prompts": ["你是谁？"], "max_new_tokens": 4}))
    summary = train.run(cfg, echo=lambda *_: None).summary
    card = (Path(cfg.output_dir) / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card  # peft's blank card is gone
    assert f"A LoRA adapter for {cfg.model.path}" in card and "> 你是守灯人林小满。" in card
    assert "| LoRA | r=4, alpha=8, dropout=0 on q_proj, k_proj" in card
    assert f"| final loss | train {summary['final_train_loss']:.4f} |" in card
    assert "| 你是谁？ | " in card.split("## Sample answers")[1]
    assert "## Evaluation" not in card

    report = evaluate(cfg.output_dir, data=str(write_json(persona_rows[:2], "eval.json")), device="cpu",
                      echo=lambda *_: None)
    assert report["decoding"]["max_new_tokens"] == 4  # the run's eval.max_new_tokens, as its sample answers
    card = (Path(cfg.output_dir) / "README.md").read_text(encoding="utf-8")
    table = card.split("## Evaluation")[1]
    assert "| metric | base | tuned |" in table and "| reply loss |" in table
