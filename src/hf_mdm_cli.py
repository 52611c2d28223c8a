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
# Everything else is handed to hf_mdm.cli.main, which builds the full parser from the same COMMANDS.

import argparse
import os
import re
import socket
import sys


COMMANDS = {
    "demo": "sample the shipped shakespeare-mdm, from nothing and from a prompt",
    "generate": "sample from a checkpoint (first-hitting, float64 by default)",
    "train": "train an MDM (or an AR baseline) with Accelerate",
    "evaluate": "sample under several sampler settings and judge the samples",
    "convert": "convert a checkpoint from another format into hf_mdm",
    "publish": "push a checkpoint with its model card and remote code to the Hub",
    "lm-eval": "lm-evaluation-harness with the model hf_mdm (lm-eval's own flags; pip install hf_mdm[lm-eval])",
}
DEBUG_ENV = "HF_MDM_DEBUG"


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


class CommandError(SystemExit):
    """Exit code 2 and one line on stderr, `hf-mdm COMMAND: error: MESSAGE` (argparse's own form for bad usage).
    The line is printed when the error is raised, since the interpreter prints nothing for an exit code."""

    def __init__(self, command: str, message) -> None:
        self.line = f"hf-mdm {command}: error: {' '.join(str(message).split())}"
        print(self.line, file=sys.stderr)
        super().__init__(2)

    def __str__(self) -> str:
        return self.line


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name (hf_mdm.pretrained.resolve_checkpoint uses it too)


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser, commands = top_level_parser()
        for name, text in COMMANDS.items():
            commands.add_parser(name, help=text)
        parser.parse_args(argv)  # prints the help or the version (or the missing-command error) and exits
    if hub_unreachable(argv):
        # huggingface_hub reads this once, when transformers first imports it: set before hf_mdm is imported, a Hub
        # id then fails at once with "offline" instead of after a minute of retries.
        os.environ["HF_HUB_OFFLINE"] = "1"
        print("hf-mdm: huggingface.co cannot be reached: working offline (Hub ids resolve only from the local "
              "cache).", file=sys.stderr)
    from hf_mdm.cli import main as run

    run(argv)


if __name__ == "__main__":
    main()
