"""The `hf-mdm` command line.

    hf-mdm demo                        the shipped Shakespeare MDM writes a sample from nothing and one from a prompt
    hf-mdm generate [CHECKPOINT]       sample a checkpoint (default: the shipped shakespeare-mdm), streaming one sample
    hf-mdm train                       train an MDM or an autoregressive baseline (Accelerate)
    hf-mdm evaluate CHECKPOINT         sample under a sweep of sampler settings and judge the samples
    hf-mdm convert                     convert a checkpoint from another format (MDLM, LLaDA, Dream) into hf_mdm
    hf-mdm lm-eval ...                 lm-evaluation-harness with the model hf_mdm (Monte-Carlo ELBO likelihoods)
    hf-mdm publish PATH REPO_ID        push a checkpoint with its model card and remote code to the Hub

CHECKPOINT (and evaluate's --judge, --ar-model) is a folder, a Hub id, or the name of a checkpoint shipped inside
hf_mdm: shakespeare-mdm, shakespeare-ar.

Errors are one line and exit code 2; `hf-mdm --debug COMMAND ...` (or HF_MDM_DEBUG=1) shows the traceback.
"""

# This module is the console script's entry point, outside the hf_mdm package on purpose: importing hf_mdm imports
# torch and transformers (seconds), and `hf-mdm`, `hf-mdm --help` and `hf-mdm --version` need neither.
# Everything else is handed to hf_mdm.cli.main, which builds the full parser on the top-level one made here. The
# names both need (the commands, the Hub-id pattern) are in hf_mdm/constants.py, which imports nothing and is loaded
# here by its path, so that nothing of the package (and of torch) is imported before it is needed.

import argparse
import importlib.util
import json
import os
import re
import socket
import sys
from pathlib import Path


def _constants():
    """hf_mdm/constants.py, loaded by its path (finding the package does not import it)."""
    package = importlib.util.find_spec("hf_mdm")
    path = Path(package.submodule_search_locations[0]) / "constants.py"
    spec = importlib.util.spec_from_file_location("hf_mdm_constants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONSTANTS = _constants()
COMMANDS, DEBUG_ENV = CONSTANTS.COMMANDS, CONSTANTS.DEBUG_ENV
HUB_ID = re.compile(CONSTANTS.HUB_ID_PATTERN)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed_version

    try:
        return installed_version("hf_mdm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def top_level_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """`hf-mdm [--debug] [--version] COMMAND ...`, with one subparser per command (empty here; hf_mdm.cli fills
    them)."""
    parser = argparse.ArgumentParser(prog="hf-mdm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf_mdm {version()}")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, commands


def hub_unreachable(argv: list[str]) -> bool:
    """True when some argument reads like a Hub id (owner/name, not a local path) and huggingface.co cannot be
    reached, checked once with a 3 s connection (skipped behind a proxy, which the socket would not use)."""
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(name) for name in
                                                 ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    if not any(HUB_ID.match(arg) and not os.path.exists(arg) for arg in argv):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return True
    return False


def cached_help(argv: list[str]) -> str | None:
    """`hf-mdm COMMAND [SUBCOMMAND] --help` from hf_mdm/command_help.json (written from the full parsers, checked
    against them by the tests), so a command's help needs neither torch nor the package: None when not cached."""
    words = [word for word in argv if word != "--debug"]
    if len(words) < 2 or words[-1] not in ("-h", "--help") or any(word.startswith("-") for word in words[:-1]):
        return None
    key = " ".join(words[:-1])
    if key == "lm-eval" and importlib.util.find_spec("lm_eval") is None:
        return None  # the command then says lm-eval is not installed
    try:
        texts = json.loads((Path(CONSTANTS.__file__).parent / "command_help.json").read_text())
    except (OSError, ValueError):
        return None
    return texts.get(key)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    text = cached_help(argv)
    if text is not None:
        sys.stdout.write(text)
        raise SystemExit(0)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser, commands = top_level_parser()
        for name, text in COMMANDS.items():
            commands.add_parser(name, help=text)
        parser.parse_args(argv)  # prints the help or the version (or the missing-command error) and exits
    if "--dry-run" in argv:
        os.environ["HF_HUB_OFFLINE"] = "1"  # a dry run touches no network, not even to look up a Hub id
    elif hub_unreachable(argv):
        # huggingface_hub reads this once, when transformers first imports it: set before hf_mdm is imported, a Hub
        # id then fails at once with "offline" instead of after a minute of retries.
        os.environ["HF_HUB_OFFLINE"] = "1"
        print("hf-mdm: huggingface.co cannot be reached: working offline (Hub ids resolve only from the local "
              "cache).", file=sys.stderr)
    from hf_mdm.cli import main as run

    run(argv, top_level_parser)


if __name__ == "__main__":
    main()
