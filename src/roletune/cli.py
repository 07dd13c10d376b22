"""`roletune` command line: parse arguments and dispatch; the work lives in the verb modules."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from roletune.data.output import FORMATS
from roletune.errors import ConfigError, Interrupted, RoletuneError, RunError

OVERRIDES_HELP = "settings on top of the config file, e.g. train.lr=2e-4 model.device=cuda:1"
BASE_MODEL_HELP = ("another copy of the base the run was trained on, a folder or hub id, in place of the one "
                   "the run records (a run copied from another machine)")
CUDA_GRAPHS_HELP = ("replay each decoding step's layers from a CUDA graph (a static KV cache; recorded once a "
                    "generate call): far less host time a token on a GPU; says so and decodes as usual elsewhere")


def build_parser() -> argparse.ArgumentParser:
    from roletune import __version__

    parser = argparse.ArgumentParser(prog="roletune", description="Turn a chat LLM into a character with LoRA.")
    parser.add_argument("--version", action="version", version=f"roletune {__version__}")
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
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train with N processes on this machine (one per GPU), started through torchrun")

    data = verbs.add_parser("data", help="inspect training data").add_subparsers(dest="data_verb", required=True,
                                                                                 metavar="DATA_COMMAND")
    preview = data.add_parser("preview", help="show tokenized examples with the trained tokens marked")
    preview.add_argument("config", help="YAML config file, or a data file (.json / .jsonl) on its own")
    preview.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    preview.add_argument("--model", metavar="PATH_OR_ID",
                         help="with a data file: the model whose tokenizer and chat template render it")
    preview.add_argument("-n", type=int, default=3, help="number of examples (default 3)")
    preview.add_argument("--json", action="store_true", help="one JSON object per example: input_ids and labels")

    speakers = data.add_parser("speakers", help="list a screenplay's or a novel's speakers and how often each speaks",
                               description="Tells a novel (speech in quotes) from a screenplay (NAME: line) by "
                                           "its layout, unless --novel says so.")
    speakers.add_argument("scripts", nargs="+", metavar="FILE", help="screenplay or novel text files")
    speakers.add_argument("--novel", action="store_true", help="read the files as a novel")
    speakers.add_argument("--narrator", metavar="ROLE", help="with a novel: the first-person narrator's name")
    from_script = data.add_parser(
        "from-script", help="cut a character dataset from a screenplay",
        description="Pair every line of ROLE with the line spoken just before it in the same scene.")
    from_script.add_argument("scripts", nargs="+", metavar="SCRIPT", help="screenplay text files, in story order")
    from_script.add_argument("--role", required=True, help="the character to learn")
    from_script.add_argument("--alias", action="append", default=[], metavar="OTHER",
                             help="another name the role speaks under (repeatable)")
    from_script.add_argument("--context", type=int, default=0, metavar="K",
                             help="with --format messages or sharegpt: keep up to K earlier turns of the scene")
    from_script.add_argument("--format", choices=FORMATS, default="alpaca", help="output layout")
    from_script.add_argument("--out", required=True, help="output file: .jsonl for JSON Lines, else one JSON list")
    from_novel = data.add_parser(
        "from-novel", help="cut a character dataset from a novel",
        description="Attribute the novel's quoted speech by its speech tags (甄嬛笑道：“……”), and pair each of "
                    "ROLE's lines with the line before it by another speaker, else the narration before it.")
    from_novel.add_argument("books", nargs="+", metavar="BOOK", help="novel text files, in story order")
    from_novel.add_argument("--role", required=True, help="the character to learn")
    from_novel.add_argument("--alias", action="append", default=[], metavar="OTHER",
                            help="another name the role goes by in speech tags (repeatable)")
    from_novel.add_argument("--narrator", action="store_true", help="the book is told by ROLE: 我 is ROLE")
    from_novel.add_argument("--context", type=int, default=0, metavar="K",
                            help="with --format messages or sharegpt: keep up to K earlier lines")
    from_novel.add_argument("--format", choices=FORMATS, default="alpaca", help="output layout")
    from_novel.add_argument("--out", required=True, help="output file: .jsonl for JSON Lines, else one JSON list")
    from_novel.add_argument("--llm", metavar="URL",
                            help="an OpenAI-compatible endpoint (…/v1) that names the speakers the rules leave out; "
                                 "its key from ROLETUNE_LLM_KEY or OPENAI_API_KEY")
    from_novel.add_argument("--llm-model", metavar="NAME", help="the model --llm asks")
    from_novel.add_argument("--llm-for", choices=["unattributed", "all"], default="unattributed",
                            help="ask about the quotes the rules leave out (default), or about every quote")
    from_novel.add_argument("--llm-rate", type=float, default=60, metavar="N", help="requests a minute at most (60)")
    from_novel.add_argument("--llm-cache", metavar="FILE",
                            help="where answers are kept as they arrive (default: OUT.llm-cache.jsonl)")

    decoding = argparse.ArgumentParser(add_help=False)
    decoding.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    decoding.add_argument("--base-model", metavar="PATH_OR_ID", help=BASE_MODEL_HELP)
    decoding.add_argument("--system", help="system prompt instead of the one training used")
    decoding.add_argument("--max-new-tokens", type=int,
                          help="reply length cap (default 512; compare: the run's eval.max_new_tokens)")
    decoding.add_argument("--temperature", type=float, help="override the model's generation config")
    decoding.add_argument("--top-p", type=float, help="override the model's generation config")
    decoding.add_argument("--top-k", type=int, help="override the model's generation config")
    decoding.add_argument("--repetition-penalty", type=float, help="override the model's generation config")
    decoding.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    decoding.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)

    chat = verbs.add_parser("chat", parents=[decoding], help="talk to the trained character in the terminal")
    chat.add_argument("run", help="a training run's output_dir, an adapter folder, or a plain model")
    chat.add_argument("--base", action="store_true", help="talk to the base model, without the adapter")
    chat.add_argument("--prompt", help="answer this one prompt and exit")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    chat.add_argument("--max-context", type=int, help="token budget for the history (default: the model's)")

    compare = verbs.add_parser("compare", parents=[decoding], help="base vs tuned answers, side by side")
    compare.add_argument("run", help="a training run's output_dir or an adapter folder")
    prompts = compare.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", metavar="FILE", help=".txt (one a line) or .jsonl (prompt or messages)")
    compare.add_argument("--out", metavar="FILE.jsonl", help="also write {prompt, base, tuned} per line")
    compare.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    compare.add_argument("--batch-size", type=int, default=16)

    generate = verbs.add_parser("generate", parents=[decoding], help="answer a file of prompts in batches")
    generate.add_argument("run", help="a training run's output_dir, an adapter folder, or a plain model")
    generate.add_argument("--input", required=True, help=".jsonl of prompts or messages (or .txt, one a line)")
    generate.add_argument("--output", required=True, help=".jsonl; an existing one is resumed")
    generate.add_argument("--batch-size", type=int, default=16)
    generate.add_argument("--base", action="store_true", help="answer with the base model")
    generate.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")

    merge = verbs.add_parser("merge", help="fold the adapter into the base weights")
    merge.add_argument("run", help="a training run's output_dir or an adapter folder")
    merge.add_argument("--out", required=True, help="new folder for the merged model")
    merge.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    merge.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    merge.add_argument("--base-model", metavar="PATH_OR_ID", help=BASE_MODEL_HELP)

    evaluate = verbs.add_parser("eval", help="base vs tuned on held-out rows: loss, BLEU-4, ROUGE-L, ...")
    evaluate.add_argument("run", help="a training run's output_dir or an adapter folder")
    evaluate.add_argument("--data", metavar="FILE", help="rows to evaluate instead of the run's held-out split")
    evaluate.add_argument("--n", type=int, help="only the first N rows")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    evaluate.add_argument("--base-model", metavar="PATH_OR_ID", help=BASE_MODEL_HELP)
    evaluate.add_argument("--max-new-tokens", type=int,
                          help="reply length cap (default: the run's eval.max_new_tokens, else 256)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--out", metavar="DIR", help="where eval.json and eval.md go (default: RUN)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier eval.json")
    evaluate.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    evaluate.add_argument("--judge", metavar="URL", help="an OpenAI-compatible endpoint (.../v1) that rates each reply "
                          "1-5 for staying in character; its key from ROLETUNE_JUDGE_KEY or OPENAI_API_KEY")
    evaluate.add_argument("--judge-model", metavar="NAME", help="the judge's model name, with --judge")

    serve = verbs.add_parser("serve", help="serve runs (and their base) behind an OpenAI-compatible API",
                             description="One process, one copy of the base weights, every run's adapter on it.")
    serve.add_argument("runs", nargs="+", metavar="RUN|NAME=RUN",
                       help="run folders (or adapter folders) on one base, or one merged or plain model; the model id "
                            "of a run is its folder name, or NAME")
    serve.add_argument("--base-model", metavar="PATH_OR_ID", help=BASE_MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 (default: ROLETUNE_API_KEY)")
    serve.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                       help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable; "
                            "default none")
    serve.add_argument("--engine", choices=["roletune", "vllm"], default="roletune",
                       help="roletune (default): this process answers; vllm: start vLLM's OpenAI-compatible server "
                            "for the same runs (GPU machines with vLLM installed; no web page)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    serve.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="default: the runs'")
    serve.add_argument("--quantization", choices=["none", "4bit", "8bit"], help="default: the runs'")

    export = verbs.add_parser("export", help="a run as a GGUF file (llama.cpp, LM Studio) or for Ollama",
                              description="Merge the adapter, convert with llama.cpp's own converter, check the file "
                                          "against the merged model. Needs pip install 'roletune[gguf]'.")
    export.add_argument("run", help="a training run's output_dir, an adapter folder, or a merged model folder")
    export.add_argument("--to", choices=["gguf", "ollama"], default="gguf",
                        help="gguf: the file alone; ollama: the file and a Modelfile (default gguf)")
    export.add_argument("--quant", choices=["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"],
                        help="f16, bf16, q8_0: the converter's own; k-quants: llama.cpp's quantizer (default q8_0, "
                             "and f16 for --adapter-only)")
    export.add_argument("--adapter-only", action="store_true",
                        help="the LoRA alone as a GGUF, which llama.cpp applies to the base's GGUF (--lora; "
                             "Ollama's ADAPTER)")
    export.add_argument("--base-gguf", metavar="FILE",
                        help="with --adapter-only: the base model's GGUF, for the reply check and the Modelfile's FROM")
    export.add_argument("--out", required=True, help="new folder for the export")
    export.add_argument("--check", choices=["auto", "replies", "logits", "none"], default="auto",
                        help="replies: llama.cpp's greedy replies against the merged model's; logits: those and "
                             "the GGUF's logits against the merged model's; auto (default): replies, and logits up "
                             "to 2B parameters")
    export.add_argument("--device", default="auto", help="where to merge: auto, cpu, cuda or cuda:N")
    export.add_argument("--base-model", metavar="PATH_OR_ID", help=BASE_MODEL_HELP)

    plot = verbs.add_parser("plot", help="draw train and eval loss against steps for one or more runs")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="training runs' output_dir")
    plot.add_argument("--out", help="PNG file (default: RUN/loss.png for one run; required for several)")

    keys = verbs.add_parser("config", help="list every config key with its default and meaning")
    keys.add_argument("config", nargs="?", help="print this config fully resolved instead")
    keys.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    keys.add_argument("--markdown", action="store_true",
                      help="print the key list as Markdown, the text of docs/config.md")
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
    _take_back_override(args)
    _quiet_libraries()
    if not sys.stderr.isatty() or getattr(args, "prompt", None):
        _no_progress_bars()  # in a log file they are noise; an answer for a script wants the answer alone
    from roletune.terminal import output_outlives_reader

    with output_outlives_reader():
        return _run(args, argv)


def _run(args, argv) -> int:
    try:
        return dispatch(args)
    except Interrupted as exc:  # the run is resumable: say exactly how (rank 0 alone in a launch)
        from roletune.training import distributed

        if distributed.current().is_main:
            print(f"roletune: {exc}; resume with: {resume_command(sys.argv[1:] if argv is None else argv, args)}",
                  file=sys.stderr)
        return exc.exit_code
    except RoletuneError as exc:
        from roletune.training import distributed

        if distributed.first_to_report(str(exc)):  # a bad config fails on every rank: say it once
            print(f"roletune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("roletune: interrupted", file=sys.stderr)
        return 130


def _take_back_override(args) -> None:
    """`train c.yaml --resume output_dir=x`: argparse gives the override to --resume as its CHECKPOINT;
    an argument of the KEY=VALUE form that is no existing path is an override, and --resume means the newest."""
    value = getattr(args, "resume", None)
    if value and "=" in value and not os.path.exists(value):
        args.overrides = [*args.overrides, value]
        args.resume = "latest"


def resume_command(argv: list[str], args) -> str:
    """The same `roletune train` command, continuing from the newest checkpoint instead of starting over."""
    from roletune.training import distributed

    words, previous = [], None
    for word in argv:
        resume = word == "--resume" or word.startswith("--resume=") or (previous == "--resume" and word == args.resume)
        if not resume and word != "--overwrite":
            words.append(word)
        previous = word
    launch = distributed.current()
    if launch.launched and launch.world_size == launch.local_world_size:  # one machine: --nproc relaunches it
        words += ["--nproc", str(launch.world_size)]
    command = shlex.join(["roletune", *words, "--resume"])
    if launch.world_size > launch.local_world_size:  # several machines: the user's launcher starts it on each
        command += " (on every machine, under your launcher)"
    return command


def llm_asking(args):
    """from-novel's --llm options, checked, or None."""
    if bool(args.llm) != bool(args.llm_model):
        raise ConfigError("--llm URL and --llm-model NAME go together")
    if not args.llm:
        return None
    if args.llm_rate <= 0:
        raise ConfigError(f"--llm-rate {args.llm_rate:g}: must be above 0 (requests a minute)")
    from roletune.data.novel_llm import Asking

    return Asking(args.llm, args.llm_model, every=args.llm_for == "all", rate=args.llm_rate, cache=args.llm_cache)


def dispatch(args) -> int:
    from roletune.config import load_config

    if args.verb == "config":
        return show_config(args)
    if args.verb == "data" and args.data_verb in ("speakers", "from-script", "from-novel"):
        from roletune.data import novel, screenplay, speech

        if args.data_verb == "speakers" and (args.novel or args.narrator or speech.is_novel(args.scripts)):
            novel.print_speakers(args.scripts, args.narrator)
        elif args.data_verb == "speakers":
            screenplay.print_speakers(args.scripts)
        elif args.data_verb == "from-script":
            screenplay.write_dataset(args.scripts, role=args.role, aliases=args.alias, context=args.context,
                                     fmt=args.format, out=args.out)
        else:
            novel.write_dataset(args.books, role=args.role, aliases=args.alias, narrator=args.narrator,
                                context=args.context, fmt=args.format, out=args.out, llm=llm_asking(args))
        return 0
    if args.verb in ("chat", "compare", "generate", "merge"):
        return use_run(args)
    if args.verb == "eval":
        from roletune.evaluate import evaluate

        evaluate(args.run, data=args.data, n=args.n, device=args.device, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, out=args.out, overwrite=args.overwrite, cuda_graphs=args.cuda_graphs,
                 base_model=args.base_model, judge=args.judge, judge_model=args.judge_model)
        return 0
    if args.verb == "plot":
        return draw(args.runs, args.out)
    if args.verb == "export":
        from roletune.export import export

        export(args.run, args.out, to=args.to, quant=args.quant, base_model=args.base_model, device=args.device,
               check=args.check, adapter_only=args.adapter_only, base_gguf=args.base_gguf)
        return 0
    if args.verb == "serve":
        from roletune.serve import serve

        serve(args.runs, base_model=args.base_model, host=args.host, port=args.port, api_key=args.api_key,
              allow_origins=args.allow_origin, device=args.device, dtype=args.dtype, quantization=args.quantization,
              engine=args.engine)
        return 0
    if args.verb == "data" and Path(args.config).suffix.lower() in (".json", ".jsonl"):
        return preview_file(args.config, args.model, args.overrides, args.n, args.json)
    if getattr(args, "model", None):
        raise RunError(f"--model goes with a data file; {args.config} is a config (set model.path in it)")
    cfg = load_config(args.config, args.overrides)
    if args.verb == "train" and args.nproc is not None:
        from roletune.training import distributed

        return distributed.relaunch(args.nproc, train_argv(args))
    if args.verb == "train":
        from roletune import train

        train.run(cfg, resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run)
    elif args.verb == "data" and args.data_verb == "preview":
        preview(cfg, args.n, args.json)
    return 0


def train_argv(args) -> list[str]:
    """The `roletune train` command line each process of a --nproc launch runs."""
    flags = [*(["--dry-run"] if args.dry_run else []), *(["--overwrite"] if args.overwrite else []),
             *(["--resume", args.resume] if args.resume else [])]
    return ["train", args.config, *args.overrides, *flags]


def use_run(args) -> int:
    from roletune import decoding, generate, run_dir

    if args.verb == "merge":
        from roletune.merge import merge

        merge(args.run, args.out, dtype=args.dtype, device=args.device, base_model=args.base_model)
        return 0
    records = None
    if args.verb == "compare":
        from roletune.data.prompts import read_prompts

        records = read_prompts(args.prompts) if args.prompts else [{"prompt": p} for p in args.prompt]
    if args.verb == "compare" and args.out:
        _refuse_existing(args.out)
    session = decoding.load_session(args.run, device=args.device, base_only=getattr(args, "base", False),
                                    base_model=args.base_model,
                                    system=args.system, cuda_graphs=args.cuda_graphs)
    greedy = not args.sample if args.verb == "compare" else args.greedy
    cap = args.max_new_tokens or (run_dir.reply_cap(args.run, 512) if args.verb == "compare" else 512)
    config = decoding.decoding_config(session, greedy=greedy, max_new_tokens=cap,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      repetition_penalty=args.repetition_penalty)
    import transformers

    transformers.set_seed(args.seed)
    if args.verb == "chat":
        who = ("the base model, its adapter off (--base)" if args.base else
               "the tuned model (base + adapter)" if session.has_adapter else "the model")
        generate.chat(session, config, prompt=args.prompt, context_tokens=args.max_context, who=who)
    elif args.verb == "generate":
        generate.generate_file(session, config, args.input, args.output, args.batch_size)
    else:
        show_comparison(session, config, records, args.out, args.batch_size)
    return 0


def show_comparison(session, config, records, out, batch_size) -> None:
    from roletune import generate, terminal
    from roletune.data.prompts import prompt_messages

    pairs = generate.compare(session, [prompt_messages(r) for r in records], config, batch_size)
    width = terminal.terminal_width()
    lines = []
    for record, (base, tuned) in zip(records, pairs):
        prompt = record.get("prompt") or record["messages"][-1]["content"]
        print(f"\n>>> {prompt}")
        print(terminal.side_by_side(base.text, tuned.text, width))
        lines.append(json.dumps({"prompt": record.get("prompt", record.get("messages")), "base": base.text,
                                 "tuned": tuned.text}, ensure_ascii=False))
    if out:
        Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"\nwrote {out}")


def draw(runs: list[str], out: str | None) -> int:
    from roletune.plot import plot_runs

    if out is None and len(runs) > 1:
        raise RunError("several runs go into one picture: pass --out FILE.png")
    print(plot_runs(runs, out or Path(runs[0]) / "loss.png"))
    return 0


def _refuse_existing(path: str) -> None:
    if Path(path).exists():
        raise RunError(f"{path}: exists; choose a new --out")


def preview(cfg, n: int, as_json: bool) -> None:
    from roletune.data.tokenize import mark_trained
    from roletune.model import load_tokenizer
    from roletune.train import build_dataset

    tokenizer = load_tokenizer(cfg.model)
    data = build_dataset(cfg, tokenizer)
    examples, report = data.train, data.report
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


def preview_file(path: str, model: str | None, overrides: list[str], n: int, as_json: bool) -> int:
    """`data preview FILE.json`: with --model, as a config with that model and file would show it; without,
    the layout, the counts and the first conversations, for a file that has no model yet."""
    from roletune.config import config_from_dict
    from roletune.data import detect_format, load_conversations, read_records

    cfg = config_from_dict({"model": {"path": model or "none"}, "data": {"path": path}}, overrides,
                           source="command line")
    if model:
        preview(cfg, n, as_json)
        return 0
    left_out: list[int] = []
    conversations = load_conversations(cfg.data, left_out)
    if as_json:
        for conversation in conversations[:n]:
            print(json.dumps({"messages": [m.as_dict() for m in conversation]}, ensure_ascii=False))
        return 0
    layout = cfg.data.format
    if layout == "auto":
        layout = f"{detect_format(read_records(path, cfg.data.split)[1][0])} (detected; data.format sets it)"
    print(f"{path}: {len(conversations) + len(left_out)} records, layout {layout}"
          + (f"; {len(left_out)} left out with an empty prompt" if left_out else ""))
    for index, conversation in enumerate(conversations[:n]):
        print(f"--- conversation {index} ---")
        for message in conversation:
            print(f"{message.role}: {message.content}")
    print("tokens and the trained spans: add --model PATH_OR_ID (the model you will train)")
    return 0


def show_config(args) -> int:
    from roletune.config import describe, dump_config, load_config, reference_markdown

    if args.markdown:  # docs/config.md: roletune config --markdown > docs/config.md
        if args.config:
            raise ConfigError("--markdown prints every key of the schema; it takes no config file")
        print(reference_markdown(), end="")
        return 0
    if args.config:
        print(dump_config(load_config(args.config, args.overrides)), end="")
        return 0
    for key, default, help_text in describe():
        print(f"{key} = {default!r}\n    {help_text}")
    return 0


def _no_progress_bars() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar made from here on, whichever library makes it
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _quiet_libraries() -> None:
    # transformers and peft warn about things roletune already decided (e.g. fp32 on CPU).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices meant for library authors
    # bitsandbytes on a CPU with AVX512-BF16 says, at import, that an optional kernel from the hub is missing.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
