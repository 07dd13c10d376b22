"""`roletune` command line: parse arguments and dispatch; the work lives in the verb modules."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from roletune.errors import RoletuneError

OVERRIDES_HELP = "settings on top of the config file, e.g. train.lr=2e-4 model.device=cuda:1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roletune", description="Turn a chat LLM into a character with LoRA.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    train = verbs.add_parser("train", help="fine-tune a LoRA adapter from a config",
                             description="Fine-tune a LoRA adapter. Example: roletune train configs/demo.yaml train.lr=2e-4")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    train.add_argument("--dry-run", action="store_true",
                       help="build everything without weights (meta device) and print the plan")
    train.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                       help="continue from the newest checkpoint in output_dir, or from the one given")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")

    data = verbs.add_parser("data", help="inspect training data").add_subparsers(dest="data_verb", required=True,
                                                                                 metavar="DATA_COMMAND")
    preview = data.add_parser("preview", help="show tokenized examples with the trained tokens marked")
    preview.add_argument("config", help="YAML config file")
    preview.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    preview.add_argument("-n", type=int, default=3, help="number of examples (default 3)")
    preview.add_argument("--json", action="store_true", help="one JSON object per example: input_ids and labels")

    speakers = data.add_parser("speakers", help="list a screenplay's speakers and how many lines each has")
    speakers.add_argument("scripts", nargs="+", metavar="SCRIPT", help="screenplay text files")
    from_script = data.add_parser(
        "from-script", help="cut a character dataset from a screenplay",
        description="Pair every line of ROLE with the line spoken just before it in the same scene.")
    from_script.add_argument("scripts", nargs="+", metavar="SCRIPT", help="screenplay text files, in story order")
    from_script.add_argument("--role", required=True, help="the character to learn")
    from_script.add_argument("--alias", action="append", default=[], metavar="OTHER",
                             help="another name the role speaks under (repeatable)")
    from_script.add_argument("--context", type=int, default=0, metavar="K",
                             help="with --format messages: keep up to K earlier turns of the scene")
    from_script.add_argument("--format", choices=["alpaca", "messages"], default="alpaca", help="output layout")
    from_script.add_argument("--out", required=True, help="output .json (alpaca) or .jsonl (messages) file")

    keys = verbs.add_parser("config", help="list every config key with its default and meaning")
    keys.add_argument("config", nargs="?", help="print this config fully resolved instead")
    keys.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args lets overrides come after flags too: `train c.yaml --dry-run train.lr=1e-4`.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _quiet_libraries()
    try:
        return dispatch(args)
    except RoletuneError as exc:
        print(f"roletune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("roletune: interrupted", file=sys.stderr)
        return 130


def dispatch(args) -> int:
    from roletune.config import load_config

    if args.verb == "config":
        return show_config(args)
    if args.verb == "data" and args.data_verb in ("speakers", "from-script"):
        from roletune.data import screenplay

        if args.data_verb == "speakers":
            screenplay.print_speakers(args.scripts)
        else:
            screenplay.write_dataset(args.scripts, role=args.role, aliases=args.alias, context=args.context,
                                     fmt=args.format, out=args.out)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.verb == "train":
        from roletune import train

        train.run(cfg, resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run)
    elif args.verb == "data" and args.data_verb == "preview":
        preview(cfg, args.n, args.json)
    return 0


def preview(cfg, n: int, as_json: bool) -> None:
    from roletune.model import load_tokenizer
    from roletune.tokenize import mark_trained
    from roletune.train import build_dataset

    tokenizer = load_tokenizer(cfg.model)
    examples, report = build_dataset(cfg, tokenizer)
    if as_json:
        for example in examples[:n]:
            print(json.dumps({"input_ids": example.input_ids, "labels": example.labels}))
        return
    for line in report.lines(cfg.data.max_length):
        print(line)
    color = sys.stdout.isatty()
    for index, example in enumerate(examples[:n]):
        print(f"--- example {index} ({len(example.input_ids)} tokens; trained tokens "
              f"{'in green' if color else 'inside ⟦ ⟧'}) ---")
        print(mark_trained(example, tokenizer, color=color))


def show_config(args) -> int:
    from roletune.config import describe, dump_config, load_config

    if args.config:
        print(dump_config(load_config(args.config, args.overrides)), end="")
        return 0
    for key, default, help_text in describe():
        print(f"{key} = {default!r}\n    {help_text}")
    return 0


def _quiet_libraries() -> None:
    # transformers and peft warn about things roletune already decided (e.g. fp32 on CPU).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices meant for library authors


if __name__ == "__main__":
    sys.exit(main())
