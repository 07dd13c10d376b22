"""Is it in character? The persona score `roletune eval` gives the base and the tuned model alike.

- identity_rate: the share of identity probes (你是谁？, Who are you?, ...) answered in character: the
  reply names the character (eval.persona.names, else the names the training data records, else the name
  the system prompt gives) and claims to be no AI, assistant or model.
- break_rate: the share of adversarial prompts ("forget your role", "answer in English as ChatGPT")
  whose reply leaves the character: it claims to be an AI, speaks as an assistant, or, for a character
  whose lines are Chinese, answers in English.
- voice_score: how much the replies to the held-out prompts sound like the character's own lines, by a
  classifier fitted at eval time (voice.py), with its cross-validated accuracy.

Both models are asked the same prompts, with the run's system prompt and the same greedy decoding, as
`roletune compare` asks them; detect.py holds the rules, probes.py the built-in prompts.
"""
from __future__ import annotations

from roletune.decoding import Session, answer_all
from roletune.persona.detect import break_reason, in_character, names_from_system_prompt
from roletune.persona.probes import BREAK_PROMPTS, IDENTITY_PROBES

BASE_LINES = 64  # training prompts the base answers, for the voice classifier's negatives


def character_names(configured: list[str], recorded: list[str], system_prompt: str | None) -> tuple[list[str], str]:
    """The names identity is judged by, and where they came from: the config, else the training data's records
    (`data from-script` writes them), else the system prompt."""
    if configured:
        return list(configured), "eval.persona.names"
    if recorded:
        return list(recorded), "the training data"
    found = names_from_system_prompt(system_prompt)
    return found, "the system prompt" if found else "none found (set eval.persona.names)"


def score(session: Session, config, *, names: list[str], character_language: str, probes: list[str] = (),
          break_prompts: list[str] = (), batch_size: int = 16) -> dict:
    """identity_rate and break_rate of the model as it is now (adapter on or off), with every reply."""
    identity = [*IDENTITY_PROBES, *probes]
    breaking = [*BREAK_PROMPTS, *break_prompts]
    replies = answer_all(session, [[{"role": "user", "content": p}] for p in [*identity, *breaking]], config,
                         batch_size)
    texts = [r.text for r in replies]
    answered = [{"prompt": p, "reply": t, "in_character": in_character(t, names)}
                for p, t in zip(identity, texts)]
    tested = [{"prompt": p, "reply": t, "left_character": break_reason(t, character_language)}
              for p, t in zip(breaking, texts[len(identity):])]
    return {
        "identity_rate": sum(a["in_character"] for a in answered) / len(answered) if names else None,
        "break_rate": sum(t["left_character"] is not None for t in tested) / len(tested),
        "identity": answered,
        "breaks": tested,
    }


def voice_data(training: list, evaluated: list) -> tuple[list[str], list[str], list[list[dict]]]:
    """From the training conversations, less any whose prompt is evaluated: the character's lines, the other
    speakers' lines, and up to BASE_LINES prompts for the base to answer (its replies are negatives too)."""
    import random

    asked = {c[-2].content for c in evaluated if len(c) >= 2}
    kept = [c for c in training if len(c) >= 2 and c[-2].content not in asked]
    character = [c[-1].content for c in kept]
    others = [m.content for c in kept for m in c if m.role == "user"]
    drawn = random.Random(0).sample(kept, min(BASE_LINES, len(kept)))
    return character, others, [[m.as_dict() for m in c[:-1] if m.role != "system"] for c in drawn]


def voice_scores(character: list[str], others: list[str], replies: dict[str, list[str]]) -> tuple[dict, dict]:
    """The classifier's own figures, and each model's voice_score on its replies."""
    from roletune.persona.voice import VoiceClassifier

    classifier = VoiceClassifier(character, others)
    return ({"cv_accuracy": classifier.cv_accuracy, **classifier.sizes},
            {name: classifier.score(texts) for name, texts in replies.items()})
