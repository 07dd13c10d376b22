"""Screenplay text -> a character dataset: each line of one role paired with the line before it.

Layout rules, the same for every screenplay (nothing here knows a particular one):
- Dialogue: `角色：台词`, `角色（舞台说明）：台词` or `NAME: line`, with a full-width or ASCII colon
  and parentheses. A name is short, has a letter in it and no sentence punctuation.
- Stage directions: a line wholly in parentheses; parentheses inside a line are removed from it.
  A stage-direction line ends an exchange: the role's next line answers what happened, not what
  was said (in 甄嬛传 episodes 1-20 the seed dataset has no pair across one, 0 of 18).
- Headings: `第N幕`, `第N场`, `第N集` (Arabic or Chinese numerals, anything after them) and
  `Scene N` / `Episode N` / `Act N`. A heading, like the end of a file, starts a new scene.
- Blank lines are ignored. Any other line fits no rule: it is reported with its location and, like
  a stage direction, no pair is cut across it, since we cannot tell who spoke it.

Pairs follow the seed dataset (huanhuan.json, cut from the 甄嬛传 screenplay): the prompt is the
single line spoken just before the role's line, by another speaker in the same scene. Every record also
names the role (and its aliases), so that `roletune eval` knows whose identity to look for.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from roletune.data.conversation import Conversation, Message
from roletune.data.output import FORMATS, render, write_aside
from roletune.data.text import read_text
from roletune.errors import DataError
from roletune.terminal import display_width

NUMERAL = r"[0-9０-９一二三四五六七八九十百千零〇两]+"
HEADING = re.compile(rf"^(第\s*{NUMERAL}\s*[幕场集]|(scene|episode|act)\s+([0-9]+|[ivxlc]+)\b)", re.IGNORECASE)
# name, an optional stage direction, a colon, the line. The direction may itself hold a colon.
DIALOGUE = re.compile(r"^(?P<name>[^：:（()）]{1,24}?)\s*(?:[（(][^（()）]*[）)])?\s*[：:](?P<text>.*)$")
DIRECTION = re.compile(r"[（(][^（()）]*[）)]")
NOT_IN_NAMES = set("，。！？；,!?;…“”\"‘’《》【】—")  # no "." : "Mr. Darcy" is a name
MAX_NAME_WORDS = 4  # longer than this, "Someone said: ..." is narration, not a speaker
EXAMPLES_SHOWN = 3
SUGGESTIONS = 5  # speaker names offered for a role that never speaks
MIN_LIKENESS = 0.3  # difflib ratio; 甄环 / 甄嬛 is 0.5


@dataclass(frozen=True)
class Turn:
    speaker: str | None  # None for a break: a stage-direction line or one that fits no layout rule
    text: str  # stage directions removed (a break keeps its whole line)
    where: str  # "file:line", for the report
    kind: str = "dialogue"  # or "stage direction", "no layout rule"


@dataclass
class Screenplay:
    """The scenes of one or more script files, and what reading them found."""
    scenes: list[list[Turn]] = field(default_factory=list)
    encodings: dict[str, str] = field(default_factory=dict)
    line_kinds: Counter = field(default_factory=Counter)  # dialogue, stage direction, heading, blank, no rule

    def speakers(self) -> Counter:
        return Counter(turn.speaker for scene in self.scenes for turn in scene if turn.speaker)

    def unparsed(self) -> list[Turn]:
        return [turn for scene in self.scenes for turn in scene if turn.kind == "no layout rule"]


# --- the two verbs -------------------------------------------------------------------------------

def print_speakers(paths: list[str]) -> None:
    """`roletune data speakers`: every speaker with its number of lines, most first."""
    screenplay = read_screenplay(paths)
    _print_reading(screenplay)
    print_speaker_counts(screenplay.speakers())


def print_speaker_counts(speakers: Counter) -> None:
    """Every speaker with its count, most first, then the names that may be one speaker's (a screenplay's
    lines or a novel's quotes)."""
    width = max(map(display_width, speakers), default=0)
    for name, count in sorted(speakers.items(), key=lambda item: (-item[1], item[0])):
        print(f"{name}{' ' * (width - display_width(name))}  {count}")
    aliases = possible_aliases(speakers)
    if aliases:
        print("possible aliases (one name begins or ends another; see --alias): "
              + ", ".join(f"{short} / {long}" for short, long in aliases))


def write_dataset(paths: list[str], *, role: str, aliases: list[str], context: int, fmt: str, out: str) -> None:
    """`roletune data from-script`: cut the role's pairs, write them to `out`, print a report."""
    target = Path(out)
    if target.exists():
        raise DataError(f"{out}: already exists; remove it or choose another --out (nothing was written)")
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if context < 0:
        raise DataError(f"--context {context}: must be 0 or more")
    if context and fmt == "alpaca":
        raise DataError("--context needs --format messages or sharegpt (an alpaca pair has no earlier turns)")
    screenplay = read_screenplay(paths)
    speakers, names = screenplay.speakers(), [role, *aliases]
    _check_names_speak(names, speakers, paths)
    role_lines = sum(speakers[name] for name in names)
    conversations, skipped = cut_conversations(screenplay.scenes, set(names), context)
    if not conversations:
        raise DataError(f"no pairs for {role}: none of its {role_lines} lines answers another speaker's line "
                        f"in the same scene ({counts(skipped)}); nothing was written")
    write_aside(target, render(conversations, fmt, lines=target.suffix.lower() == ".jsonl", names=names))
    _print_reading(screenplay)
    print(f"speaker lines: {sum(speakers.values())} by {len(speakers)} speakers; "
          f"role {' / '.join(names)}: {role_lines} lines")
    for reason, count in skipped.most_common():
        print(f"  skipped {count}: {reason}")
    print(f"pairs written: {len(conversations)} to {out} ({fmt}"
          + (f", up to {context} earlier turns" if context else "") + ")")
    if context:
        # data.train_on=assistant (the default) trains every assistant turn of a record, so each of the
        # role's lines would be trained again in every later record that holds it as context.
        print("note: the earlier turns repeat lines that have records of their own; train with "
              "data.train_on: last so that each line is trained once, in its own record")


# --- reading -------------------------------------------------------------------------------------

def read_screenplay(paths: list[str]) -> Screenplay:
    screenplay = Screenplay()
    for path in paths:
        text, encoding = read_text(Path(path), "screenplay text")
        screenplay.encodings[path] = encoding
        screenplay.scenes += parse_scenes(text, path, screenplay.line_kinds)
    if not screenplay.speakers():
        examples = "; ".join(f"{turn.where}: {turn.text[:40]}" for turn in screenplay.unparsed()[:EXAMPLES_SHOWN])
        raise DataError(f"{paths_list(paths)}: no dialogue lines; expected `角色：台词` or `NAME: line`"
                        + (f" (e.g. {examples})" if examples else ""))
    return screenplay


def parse_scenes(text: str, name: str, line_kinds: Counter | None = None) -> list[list[Turn]]:
    """Split a script into scenes of turns; `line_kinds` counts each kind of line seen."""
    line_kinds = Counter() if line_kinds is None else line_kinds
    scenes: list[list[Turn]] = [[]]
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.replace("\ufeff", "").strip()  # a BOM inside: files pasted together
        kind = line_kind(line)
        line_kinds[kind] += 1
        where = f"{name}:{number}"
        if kind == "heading" and scenes[-1]:
            scenes.append([])
        elif kind == "dialogue":
            match = DIALOGUE.match(line)
            scenes[-1].append(Turn(match["name"].strip(), remove_directions(match["text"]), where))
        elif kind in ("stage direction", "no layout rule"):
            scenes[-1].append(Turn(None, line, where, kind))
    return [scene for scene in scenes if scene]


def line_kind(line: str) -> str:
    if not line:
        return "blank"
    if HEADING.match(line):
        return "heading"
    if line[0] in "（(" and not remove_directions(line):
        return "stage direction"
    match = DIALOGUE.match(line)
    if match and _is_name(match["name"].strip()):
        return "dialogue"
    return "no layout rule"


def _is_name(name: str) -> bool:
    return (bool(name) and any(char.isalpha() for char in name) and not NOT_IN_NAMES & set(name)
            and len(name.split()) <= MAX_NAME_WORDS)


def remove_directions(text: str) -> str:
    # Removed without a space, which Chinese text must not gain; the words around a direction in
    # English already have their own spaces, and runs of spaces become one.
    return " ".join(DIRECTION.sub("", text).split())


# --- pairing -------------------------------------------------------------------------------------

def cut_conversations(scenes: list[list[Turn]], names: set[str], context: int) -> tuple[list[Conversation], Counter]:
    """Every line of `names` that answers another speaker becomes a conversation ending in that line.

    Returns the conversations (first occurrence of each, in script order) and why other lines
    of the role were skipped.
    """
    conversations, seen, skipped = [], set(), Counter()
    for scene in scenes:
        turns = []
        for turn in scene:
            # A line with nothing left after its stage directions (a nod, a silence) is not speech:
            # it neither answers nor is answered.
            if turn.speaker in names and not turn.text:
                skipped["empty after removing stage directions"] += 1
            elif turn.text and (turns or turn.speaker):  # directions before the first line set the scene
                turns.append(turn)
        for index, turn in enumerate(turns):
            if turn.speaker not in names:
                continue
            reason = _why_unanswerable(turns[index - 1] if index else None, names)
            if reason:
                skipped[reason] += 1
                continue
            conversation = to_conversation(_window(turns, index, context), names)
            key = tuple(conversation)
            if key in seen:
                skipped["duplicate of an earlier pair"] += 1
                continue
            seen.add(key)
            conversations.append(conversation)
    return conversations, skipped


def _why_unanswerable(previous: Turn | None, names: set[str]) -> str | None:
    if previous is None:
        return "opens its scene (no line before it)"
    if previous.kind == "stage direction":
        return "follows a stage-direction line (the exchange was interrupted)"
    if previous.kind == "no layout rule":
        return "follows a line that fits no layout rule"
    if previous.speaker in names:
        # The role going on after its own line (one speech written as two). The seed dataset has
        # no such pairs, and the role's own words are no prompt a user would type.
        return "follows the role's own line"
    return None


def _window(turns: list[Turn], index: int, context: int) -> list[Turn]:
    """The role's line, the line before it, and up to `context` earlier ones, not across a break."""
    start = index - 1
    while start > 0 and index - 1 - start < context and turns[start - 1].speaker is not None:
        start -= 1
    return turns[start:index + 1]


def to_conversation(turns: list[Turn], names: set[str]) -> Conversation:
    """Other speakers are the user, the role is the assistant.

    Lines in a row on one side become one message, joined by newlines: the trainer needs user and
    assistant to alternate. With no context the user side is just the single line before the role's
    line, as in the seed dataset: in 甄嬛传 episodes 1-20, where two other speakers talk before 甄嬛,
    the seed's prompt is the last line alone in 198 of 209 cases and the two joined in none.
    An opening assistant message is dropped.
    """
    messages: list[Message] = []
    for turn in turns:
        role = "assistant" if turn.speaker in names else "user"
        if messages and messages[-1].role == role:
            messages[-1] = Message(role, messages[-1].content + "\n" + turn.text)
        elif messages or role == "user":
            messages.append(Message(role, turn.text))
    return messages


# --- reporting -------------------------------------------------------------------------------------

def _check_names_speak(names: list[str], speakers: Counter, paths: list[str]) -> None:
    for name in names:
        if speakers[name]:
            continue
        raise DataError(f"{'role' if name == names[0] else 'alias'} {name} never speaks in {paths_list(paths)}; "
                        f"{suggested_speakers(name, speakers, 'lines')} (see roletune data speakers)")


def suggested_speakers(name: str, speakers: Counter, unit: str) -> str:
    """For a name that never speaks: the speakers most like it, else those who speak most, with their counts."""
    close = closest_speakers(name, speakers)
    label = "closest speakers" if close else f"speakers with the most {unit}"
    close = close or [speaker for speaker, _ in speakers.most_common(SUGGESTIONS)]
    return f"{label}: " + (", ".join(f"{speaker} ({speakers[speaker]} {unit})" for speaker in close) or "none")


def closest_speakers(name: str, speakers: Counter) -> list[str]:
    """Speakers whose names look most like `name` (case aside); among equals, the one with most lines first."""
    def likeness(speaker: str) -> float:
        return difflib.SequenceMatcher(None, name.casefold(), speaker.casefold()).ratio()

    ranked = sorted(speakers, key=lambda speaker: (-likeness(speaker), -speakers[speaker], speaker))
    return [speaker for speaker in ranked if likeness(speaker) >= MIN_LIKENESS][:SUGGESTIONS]


def possible_aliases(speakers: Counter) -> list[tuple[str, str]]:
    """Names that begin or end another name (陵容 / 安陵容, Darcy / Mr. Darcy), most lines first.

    A name made only of other names (甄嬛眉庄, a line spoken together) is a group, not an alias.
    """
    by_lines = sorted(speakers, key=lambda name: (-speakers[name], name))
    return [(short, long) for short in by_lines for long in by_lines
            if len(short) >= 2 and short != long and (long.startswith(short) or long.endswith(short))
            and not _is_group(long, set(speakers))]


def _is_group(name: str, others: set[str]) -> bool:
    """Whether `name` is two or more of `others` written together (a separator between them is allowed)."""
    return _made_of(name, others - {name})


def _made_of(name: str, others: set[str]) -> bool:
    name = name.strip("、,，&/ ")
    return bool(name) and (name in others or any(
        name.startswith(other) and _made_of(name[len(other):], others) for other in others if other))


def _print_reading(screenplay: Screenplay) -> None:
    print("read " + ", ".join(f"{path} ({encoding})" for path, encoding in screenplay.encodings.items()))
    kinds = screenplay.line_kinds
    print(f"lines read: {sum(kinds.values())} ({counts(kinds)}); scenes: {len(screenplay.scenes)}")
    unparsed = screenplay.unparsed()
    if unparsed:
        print(f"lines that fit no layout rule, kept out of every pair ({len(unparsed)}), e.g.:")
        for turn in unparsed[:EXAMPLES_SHOWN]:
            print(f"  {turn.where}: {turn.text[:60]}")


def counts(counter: Counter) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in counter.most_common()) or "nothing"


def paths_list(paths: list[str]) -> str:
    shown = ", ".join(paths[:EXAMPLES_SHOWN])
    return shown + (f" and {len(paths) - EXAMPLES_SHOWN} more" if len(paths) > EXAMPLES_SHOWN else "")
