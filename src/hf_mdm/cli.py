"""The `hf-mdm` commands: the full parser, built on the top-level one of the console script (`hf_mdm_cli`, which
answers `hf-mdm --help` without importing torch), the demo, generate and publish commands, and every other command's
parser from its own module (training/cli.py, evaluation/cli.py, convert/cli.py). Errors go through one boundary
(`hf_mdm.console.run_command`): one line and exit code 2.

    python -m hf_mdm_cli COMMAND ...     # the same as `hf-mdm COMMAND ...`
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


DEMO_PROMPT = "ROMEO.\nBut soft, what light"
LOAD_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class DraftPrinter:
    """A streamer that shows one sample as it is unmasked: the prompt, then the draft with each [MASK] drawn as '_'.

    On a terminal it redraws the draft in place (at most every `interval` seconds; when the draft is taller than the
    screen, its end). Anywhere else (a log, a pipe) it never redraws: it prints one snapshot, when half of the
    generated tokens are unmasked. Either way nothing of the drawing is left at the end, so the caller prints the
    final text. generate() calls put() with the prompt, put_draft() after every step, put() with the result, end().
    """

    MASK = "\033[2m_\033[0m"  # a [MASK] on a terminal: a dim '_'

    def __init__(self, tokenizer, mask_token_id: int, file=None, live: bool | None = None, interval: float = 0.05):
        self.tokenizer, self.mask_token_id = tokenizer, mask_token_id
        self.file = file if file is not None else sys.stdout
        self.live = self.file.isatty() if live is None else live
        self.interval = interval
        self.prompt = None  # the prompt's cells, once put() has received it
        self.rows = 0  # terminal rows of the drawing on screen
        self.last_draw = 0.0
        self.snapshot_taken = False

    def render(self, ids: list[int]) -> list[str]:
        """One cell per character (one terminal column): runs of real tokens decoded together, each [MASK] as MASK."""
        cells, run = [], []
        for token in ids + [None]:
            if token is not None and token != self.mask_token_id:
                run.append(token)
                continue
            cells += self.tokenizer.decode(run) if run else []
            run = []
            if token is not None:
                cells.append(self.MASK)
        return cells

    def put(self, value) -> None:
        if self.prompt is None:
            self.prompt = self.render(value[0].tolist())

    def put_draft(self, value) -> None:
        ids = value[0].tolist()
        masked = sum(token == self.mask_token_id for token in ids)
        if self.live:
            now = time.monotonic()
            if masked == 0 or now - self.last_draw >= self.interval:
                self.last_draw = now
                self.draw(self.prompt + self.render(ids))
        elif not self.snapshot_taken and 2 * masked <= len(ids):
            self.snapshot_taken = True
            text = "".join("_" if cell == self.MASK else cell for cell in self.prompt + self.render(ids))
            self.file.write(f"[draft: {len(ids) - masked} of {len(ids)} tokens unmasked]\n{text}\n[end of draft]\n")
            self.file.flush()

    def draw(self, cells: list[str]) -> None:
        """Replaces the drawing on screen by the last lines of `cells` that fit (the end of a longer line)."""
        columns, height = shutil.get_terminal_size()
        lines = [[]]
        for cell in cells:
            if cell == "\n":
                lines.append([])
            else:
                lines[-1].append(cell)
        shown, rows, free = [], 0, max(1, height - 1)
        for line in reversed(lines):
            line_rows = max(1, -(-len(line) // columns))
            if rows + line_rows > free:  # only the end of this line fits
                if free - rows:
                    shown.insert(0, line[-(free - rows) * columns:])
                    rows = free
                break
            shown.insert(0, line)
            rows += line_rows
        self.clear()
        self.file.write("\n".join("".join(line) for line in shown))
        self.file.flush()
        self.rows = rows

    def clear(self) -> None:
        """Moves the cursor back to the start of the drawing and erases it."""
        if self.rows:
            self.file.write("\r" + (f"\033[{self.rows - 1}A" if self.rows > 1 else "") + "\033[J")
            self.rows = 0

    def end(self) -> None:
        self.clear()
        self.file.flush()


def demo(args: argparse.Namespace) -> None:
    """Loads the shipped MDM and samples with its own generation defaults (exact first-hitting sampling, float64
    draws): once from nothing, once from --prompt."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from hf_mdm.constants import DEFAULT_MDM, PRETRAINED
    from hf_mdm.pretrained import pretrained_path

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if not args.prompt:
        raise ValueError("--prompt must not be empty.")
    path = pretrained_path(DEFAULT_MDM)
    progress_bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the demo
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
    finally:
        if progress_bars:
            logging.enable_progress_bar()
    context = model.config.max_position_embeddings
    if args.max_new_tokens is not None and args.max_new_tokens > context:
        raise ValueError(f"--max-new-tokens must be <= the model's context ({context}), got {args.max_new_tokens}.")
    prompt = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    prompt_new_tokens = args.max_new_tokens or context - prompt.shape[1]
    if prompt.shape[1] + prompt_new_tokens > context:
        raise ValueError(f"--prompt is {prompt.shape[1]} tokens; with {prompt_new_tokens} new tokens that exceeds the "
                         f"model's context ({context}).")

    settings = model.generation_config
    exact = settings.sampler == "first_hitting" and (settings.tokens_per_step or 1) == 1 and settings.steps is None
    print(f"hf-mdm demo: {DEFAULT_MDM} ({PRETRAINED[DEFAULT_MDM]}); sampler={settings.sampler}"
          f"{' (exact, one network call per token)' if exact else ''}, sampling_dtype={settings.sampling_dtype}, "
          f"temperature={settings.temperature:g}, seed={args.seed}", flush=True)
    # One 8 M-parameter network at batch 1 gains little from a second CPU thread, and on a shared 2-core machine two
    # threads ran 10-30x slower than one while another process was busy: one thread, unless OMP_NUM_THREADS says.
    threads = torch.get_num_threads()
    if model.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    samples = [("unconditional", None, args.max_new_tokens or context),
               (f"from the prompt {args.prompt!r} ({prompt.shape[1]} tokens)", prompt, prompt_new_tokens)]
    generator = torch.Generator().manual_seed(args.seed)  # one stream for both samples, so they differ
    try:
        for title, prompt_ids, new_tokens in samples:
            print(f"\n[{title}, {new_tokens} new tokens]", flush=True)
            streamer = None if args.no_stream else DraftPrinter(tokenizer, model.config.mask_token_id)
            start = time.perf_counter()
            out = model.generate(prompt_ids, max_new_tokens=new_tokens, generator=generator, streamer=streamer,
                                 return_dict_in_generate=True)
            seconds = time.perf_counter() - start
            print(tokenizer.decode(out.sequences[0]))
            where = model.device.type
            if where == "cpu":
                where = f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}"
            print(f"[NFE = {out.nfe} network calls for {new_tokens} new tokens; wall time {seconds:.1f} s on {where}]",
                  flush=True)
    finally:
        torch.set_num_threads(threads)


def check_device(device: str) -> None:
    """A device torch can use here: a CUDA or MPS device only where one is available."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}).") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this machine has no CUDA device (or torch is a CPU build: "
                         f"{torch.__version__}); use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available here; use --device cpu.")


def generate(args: argparse.Namespace) -> None:
    """Samples from a checkpoint (a folder, a Hub id or a shipped name) with its own tokenizer, streaming the draft
    when there is one sample."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from hf_mdm import MDMGenerationConfig  # also registers the model types with the Auto classes
    from hf_mdm.generation_mdm import cut_at_eos
    from hf_mdm.generation_options import generation_kwargs
    from hf_mdm.pretrained import resolve_checkpoint

    settings = generation_kwargs(args)
    MDMGenerationConfig(**settings)  # bad settings fail here, before the model is loaded
    if args.prompt is not None and args.chat is not None:
        raise ValueError("give --prompt (a prefix) or --chat (a user message), not both.")
    if args.dtype not in LOAD_DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(LOAD_DTYPES)}, got {args.dtype!r}.")
    check_device(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint, require_mdm=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.tokenizer or checkpoint))
    if args.chat is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat needs a tokenizer with a chat template; {args.tokenizer or checkpoint}'s has none "
                         "(use --prompt for a plain prefix).")
    model = AutoModel.from_pretrained(checkpoint, dtype=LOAD_DTYPES[args.dtype]).to(args.device)
    prompt = None
    if args.chat is not None:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.chat}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"].to(args.device)
    elif args.prompt:
        prompt = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(args.device)
    stream = args.num_samples == 1 and not args.no_stream
    start = time.perf_counter()
    if args.max_new_tokens is not None:  # else the checkpoint's generation_config decides (128 in converted folders)
        settings["max_new_tokens"] = args.max_new_tokens
    out = model.generate(prompt, num_return_sequences=args.num_samples,
                         generator=torch.Generator().manual_seed(args.seed), return_dict_in_generate=True,
                         streamer=DraftPrinter(tokenizer, model.config.mask_token_id) if stream else None, **settings)
    seconds = time.perf_counter() - start
    prompt_length = 0 if prompt is None else prompt.shape[1]
    if args.chat is not None:  # the answer only, up to its first end-of-turn/EOS (instruct MDMs pad with EOS)
        answers = cut_at_eos(out.sequences, model.generation_config.eos_token_id, start=prompt_length)
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    else:
        texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=False)
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{text}")
    generated = out.sequences.shape[1] - prompt_length
    print(f"NFE = {out.nfe} network calls for {generated} tokens x {args.num_samples} sample(s); "
          f"{seconds / args.num_samples:.2f} s per sample")


def add_publish_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `publish` subcommand (hf_mdm.hub.publish) to an argparse subparsers object."""
    from hf_mdm.constants import COMMANDS
    from hf_mdm.hub import publish

    parser = subparsers.add_parser("publish", help=COMMANDS["publish"], description=publish.__doc__.split("\n")[0])
    parser.add_argument("path", help="a save_pretrained folder with its tokenizer and README.md (write_model_card)")
    parser.add_argument("repo_id", help="the Hub model repo, owner/name; created if missing")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                            help="create the repo private if it is missing")
    visibility.add_argument("--public", dest="private", action="store_const", const=False,
                            help="create the repo public if it is missing; one of the two is needed to create one")
    parser.add_argument("--token", default=None, help="a Hub token with write access; default: HF_TOKEN or the login")
    parser.add_argument("--revision", default=None, help="the branch to commit to, created if missing; default: main")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--dry-run", action="store_true", help="check the folder and list its files; upload nothing")
    parser.set_defaults(func=run_publish)
    return parser


def run_publish(args: argparse.Namespace) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from hf_mdm.hub import check_repo_id, checkpoint_files, publish

    try:
        if args.dry_run:
            check_repo_id(args.repo_id)
            files = checkpoint_files(args.path)
        else:
            files = publish(args.path, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                            commit_message=args.commit_message)
    except (HfHubHTTPError, ConnectionError) as error:
        raise ValueError(f"the Hub refused or could not be reached: {str(error).splitlines()[0]}") from None
    print("\n".join(files))
    url = f"{constants.ENDPOINT}/{args.repo_id}" + (f"/tree/{args.revision}" if args.revision else "")
    print(f"{'would upload' if args.dry_run else 'uploaded'} {len(files)} files to {url}")


def build_parser(top_level_parser) -> argparse.ArgumentParser:
    """The full `hf-mdm` parser, built on the console script's top-level one."""
    from hf_mdm.constants import COMMANDS, DEFAULT_MDM
    from hf_mdm.convert.cli import add_convert_parser
    from hf_mdm.evaluation.cli import add_evaluate_parser
    from hf_mdm.generation_options import add_generation_flags
    from hf_mdm.training.cli import add_train_parser

    parser, commands = top_level_parser()
    demo_parser = commands.add_parser("demo", help=COMMANDS["demo"])
    demo_parser.add_argument("--prompt", default=DEMO_PROMPT,
                             help="the prefix of the second sample (default: %(default)r)")
    demo_parser.add_argument("--max-new-tokens", type=int, default=None,
                             help="tokens to generate per sample (default: fill the model's context)")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--no-stream", action="store_true", help="print only the final texts")
    demo_parser.set_defaults(func=demo)
    gen = commands.add_parser("generate", help=COMMANDS["generate"])
    gen.add_argument("checkpoint", nargs="?", default=DEFAULT_MDM,
                     help="a saved hf_mdm folder or Hub id with its tokenizer, or a shipped name "
                     "(default: %(default)s)")
    gen.add_argument("--prompt", default=None, help="a prefix; without it, unconditional samples")
    gen.add_argument("--chat", default=None, metavar="TEXT",
                     help="a user message, wrapped in the tokenizer's chat template; prints the answer up to its EOS")
    gen.add_argument("--dtype", default="auto",
                     help="weights dtype: auto (the checkpoint's), float32, bfloat16, float16 (default: auto)")
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="default: the checkpoint's generation config, else fill the model's context")
    gen.add_argument("--num-samples", type=int, default=1)
    add_generation_flags(gen)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", default=None, help="default: the checkpoint's own")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--no-stream", action="store_true", help="print only the final text")
    gen.set_defaults(func=generate)
    add_train_parser(commands)
    add_evaluate_parser(commands)
    add_convert_parser(commands)
    add_publish_parser(commands)
    commands.add_parser("lm-eval", add_help=False, help=COMMANDS["lm-eval"])
    return parser


# Every command's --help, as the full parsers print it, shipped beside this module: the console script prints it
# without importing torch (under a second, where building the parsers imports the package: seconds).
# tests/test_cli.py checks it against the parsers; after changing a flag, write it again with
# `python -c "import hf_mdm_cli, hf_mdm.cli as c; c.write_help_cache(hf_mdm_cli.top_level_parser)"`.
HELP_CACHE = Path(__file__).with_name("command_help.json")
HELP_COLUMNS = "100"


def command_help_texts(top_level_parser) -> dict[str, str]:
    """{"train": ..., "convert llada": ..., "lm-eval": ...}: every command's help at HELP_COLUMNS columns."""
    import contextlib
    import io

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        texts = {}

        def walk(parser, words):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, child in action.choices.items():
                        if name != "lm-eval":
                            texts[" ".join([*words, name])] = child.format_help()
                            walk(child, [*words, name])

        walk(build_parser(top_level_parser), [])
        try:
            from hf_mdm.evaluation.harness import main as lm_eval_main

            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                lm_eval_main(["--help"])
            texts["lm-eval"] = out.getvalue()
        except ImportError:
            pass
        return texts
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def write_help_cache(top_level_parser) -> None:
    """Writes HELP_CACHE from the parsers built on the console script's `top_level_parser`."""
    import json

    HELP_CACHE.write_text(json.dumps(command_help_texts(top_level_parser), indent=1, sort_keys=True) + "\n")


def main(argv: list[str], top_level_parser) -> None:
    """Runs `hf-mdm ARGV` on the parser `top_level_parser()` makes (the console script's)."""
    from hf_mdm.console import run_command
    from hf_mdm.constants import DEBUG_ENV

    debug = argv[:1] == ["--debug"] or bool(os.environ.get(DEBUG_ENV))
    argv = argv[1:] if argv[:1] == ["--debug"] else argv
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own flags
        try:
            from hf_mdm.evaluation.harness import main as lm_eval_main
        except ImportError as error:
            top_level_parser()[0].exit(
                2, f"hf-mdm lm-eval: error: lm-eval is not installed ({error}); pip install 'hf_mdm[lm-eval]'.\n")
        return run_command("lm-eval", lm_eval_main, argv[1:], debug=debug)
    parser = build_parser(top_level_parser)
    args = parser.parse_args(argv)
    run_command(getattr(args, "command_label", args.command), args.func, args, debug=debug)
