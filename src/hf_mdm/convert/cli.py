"""`hf-mdm convert`: checkpoint conversion on the command line.

    hf-mdm convert mdlm kuleshov-group/mdlm-owt ./mdlm-owt-hf        # Hub repo id (downloaded) or Hub-layout folder
    hf-mdm convert mdlm outputs/owt/checkpoints/last.ckpt ./mdlm-hf   # MDLM Lightning checkpoint (EMA weights)

`add_convert_parser(subparsers)` adds the `convert` subcommand to the `hf-mdm` parser; `main()` runs it alone
(`python -m hf_mdm.convert.cli mdlm SRC DST`).
"""

import argparse
import sys


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def convert_mdlm_command(args: argparse.Namespace) -> None:
    from .mdlm import convert_mdlm
    from .safe_load import ConversionError

    try:
        result = convert_mdlm(
            args.src,
            args.dst,
            revision=args.revision,
            use_ema=not args.no_ema,
            n_heads=args.n_heads,
            model_length=args.model_length,
            time_conditioning=args.time_conditioning,
            mask_token_id=args.mask_token_id,
            tokenizer=args.tokenizer,
            license=args.license,
            overwrite=args.overwrite,
            verify=not args.no_verify,
        )
    except ConversionError as error:
        print(f"hf-mdm convert mdlm: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    config = result.model.config
    print(f"converted {result.source.name} ({result.source.layout} layout"
          f"{', EMA weights' if result.source.used_ema else ''}) -> {result.path}")
    print(f"  {sum(p.numel() for p in result.model.parameters()) / 1e6:.1f} M parameters, vocab {config.vocab_size}, "
          f"[MASK] = {config.mask_token_id}, time_conditioning = {config.time_conditioning}")
    for note in result.notes:
        print(f"  note: {note}")
    if not args.no_verify:
        print("  verified: the saved folder reloads to identical logits")


def _add_format_parsers(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    mdlm = formats.add_parser(
        "mdlm",
        help="MDLM (kuleshov-group/mdlm-owt): Hub layout folder or repo id, or a Lightning .ckpt",
        description="Convert an MDLM checkpoint into a hub-ready hf_mdm folder with identical outputs.",
    )
    mdlm.add_argument("src", metavar="SRC", help="Hub-layout folder, Hub repo id, or MDLM Lightning checkpoint file")
    mdlm.add_argument("dst", metavar="DST", help="output folder (empty or absent unless --overwrite)")
    mdlm.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id")
    mdlm.add_argument("--no-ema", action="store_true", help="Lightning: convert the raw weights, not the EMA")
    mdlm.add_argument("--n-heads", type=int, help="attention heads, when the source does not say")
    mdlm.add_argument("--model-length", type=int, help="context length, when the source does not say")
    mdlm.add_argument("--time-conditioning", type=_bool, metavar="{true,false}",
                      help="whether the network reads the noise level, when the source does not say")
    mdlm.add_argument("--mask-token-id", type=int,
                      help="[MASK] id (default: the tokenizer's mask token, else vocab_size - 1, as MDLM does)")
    mdlm.add_argument("--tokenizer", help="folder with tokenizer files to ship (default: SRC's own, if any)")
    mdlm.add_argument("--license", help="the card's Hub license id (default: the source card's, else 'other')")
    mdlm.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    mdlm.add_argument("--no-verify", action="store_true", help="skip reloading DST to check its logits")
    mdlm.set_defaults(func=convert_mdlm_command)


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `convert` (with its formats, e.g. `convert mdlm SRC DST`) to `hf-mdm`'s subparsers; sets `func`."""
    parser = subparsers.add_parser("convert", help="convert a checkpoint from another format into hf_mdm",
                                   description="Convert a checkpoint from another format into hf_mdm.")
    _add_format_parsers(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-mdm convert", description="Convert a checkpoint into hf_mdm.")
    _add_format_parsers(parser)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
