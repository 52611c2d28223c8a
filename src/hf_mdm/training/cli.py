"""`hf-mdm train`: the flags are the fields of `TrainConfig`; `--config FILE` (YAML or JSON) gives defaults that
flags override. Runs unchanged under `accelerate launch` and `torchrun`.

    hf-mdm train --train-files corpus.txt --train-tokenizer 4096 --model-config tiny --max-steps 200
    hf-mdm train --output-dir runs/my-mdm --resume           # the run's saved settings; flags given again override
    python -m hf_mdm.training.cli --config run.yaml --resume
"""

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from ..console import run_command
from ..constants import COMMANDS
from .checkpointing import RUN_CONFIG_FILE
from .loop import TrainConfig, train


def _flag_kwargs(config_field: dataclasses.Field) -> dict:
    """argparse options for one TrainConfig field, from its type and metadata."""
    # argparse formats help strings with %: a literal one ("~30% more compute") must be doubled.
    kwargs = {"help": config_field.metadata["help"].replace("%", "%%"), "default": argparse.SUPPRESS}
    if "choices" in config_field.metadata:
        kwargs["choices"] = config_field.metadata["choices"]
    kind = config_field.type
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is bool:
        return {**kwargs, "action": "store_true"}
    if typing.get_origin(kind) is list:
        return {**kwargs, "nargs": "+" if config_field.default is None else "*", "type": str}
    return {**kwargs, "type": kind}


def read_config_file(path: str) -> dict:
    """Settings from a YAML or JSON file whose keys are TrainConfig fields (dashes or underscores)."""
    text = Path(path).read_text()
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml  # only needed for YAML config files

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"--config {path!r} is not valid YAML{where}: {getattr(error, 'problem', error)}.") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {path!r} is not valid JSON (line {error.lineno}, column {error.colno}): "
                             f"{error.msg}.") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of settings.")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path!r} has unknown settings {unknown}.")
    return values


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `train` subcommand to an argparse subparsers object; its `func` runs the training."""
    parser = subparsers.add_parser("train", help=COMMANDS["train"],
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML or JSON file of settings; flags override it")
    for config_field in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + config_field.name.replace("_", "-"), dest=config_field.name,
                            **_flag_kwargs(config_field))
    parser.set_defaults(func=run_train)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: --config, then the flags. With --resume and a run in --output-dir, the run's own saved
    settings come first, so the folder alone resumes it; flags given again override them, and the output-directory
    check then refuses those a resumed run may not change."""
    values = read_config_file(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    saved = Path(values.get("output_dir", TrainConfig.output_dir)) / RUN_CONFIG_FILE
    if values.get("resume") and saved.is_file():
        try:
            run = json.loads(saved.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{saved} is not valid JSON: the run's settings cannot be read to resume it.") from None
        values = {**{key: value for key, value in run.items() if key in names}, **values}
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> None:
    """Bad settings, and bad input found before training starts (`InputError`), are ValueErrors: the console turns
    them into one line."""
    train(config_from_args(args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-mdm")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    run_command("train", args.func, args)


if __name__ == "__main__":
    main()
