"""`hf-mdm convert`: checkpoint conversion on the command line.

    hf-mdm convert mdlm kuleshov-group/mdlm-owt ./mdlm-owt-hf        # Hub repo id (downloaded) or Hub-layout folder
    hf-mdm convert mdlm outputs/owt/checkpoints/last.ckpt ./mdlm-hf   # MDLM Lightning checkpoint (EMA weights)
    hf-mdm convert llada GSAI-ML/LLaDA-8B-Instruct ./llada-8b-instruct-hf
    hf-mdm convert dream Dream-org/Dream-v0-Instruct-7B ./dream-7b-instruct-hf
    hf-mdm convert sdar JetLM/SDAR-1.7B-Chat ./sdar-1.7b-chat-hf
    hf-mdm convert fast-dllm-v2 Efficient-Large-Model/Fast_dLLM_v2_1.5B ./fast-dllm-v2-1.5b-hf
    hf-mdm convert llada-moe inclusionAI/LLaDA-MoE-7B-A1B-Instruct ./llada-moe-7b-instruct-hf
    hf-mdm convert rnd1 radicalnumerics/RND1-Base-0910 ./rnd1-base-hf
    hf-mdm convert llada2 inclusionAI/LLaDA2.0-mini ./llada2-mini-hf
    hf-mdm convert bd3lm kuleshov-group/bd3lm-owt-block_size4 ./bd3lm-owt-bs4-hf

`add_convert_parser(subparsers)` adds the `convert` subcommand to the `hf-mdm` parser; `main()` runs it alone
(`python -m hf_mdm.convert.cli mdlm SRC DST`).
"""

import argparse
import sys
import warnings

from ..console import run_command
from ..constants import COMMANDS


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def convert_mdlm_command(args: argparse.Namespace) -> None:
    from .mdlm import convert_mdlm

    with warnings.catch_warnings():  # what convert_mdlm warns about is printed below, as a note
        warnings.filterwarnings("ignore", message="hf_mdm convert mdlm:")
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
            attend_to_padding=args.attend_to_padding,
            length_extrapolation=args.length_extrapolation,
            license=args.license,
            overwrite=args.overwrite,
            verify=not args.no_verify,
            family=args.family,
        )
    config = result.model.config
    print(f"converted {result.source.name} ({result.source.layout} layout"
          f"{', EMA weights' if result.source.used_ema else ''}) -> {result.path}")
    print(f"  {sum(p.numel() for p in result.model.parameters()) / 1e6:.1f} M parameters, vocab {config.vocab_size}, "
          f"[MASK] = {config.mask_token_id}, time_conditioning = {config.time_conditioning}"
          f"{f', blocks of {config.diffusion_block_size}' if config.diffusion_block_size else ''}")
    for note in result.notes:
        print(f"  note: {note}")
    if not args.no_verify:
        print("  verified: the saved folder reloads to identical logits")


def convert_llama_family_command(args: argparse.Namespace) -> None:
    from .llama_family import convert_llama_family

    result = convert_llama_family(args.family, args.src, args.dst, revision=args.revision, license=args.license,
                                  overwrite=args.overwrite, verify=not args.no_verify)
    config = result.source.config
    print(f"converted {result.source.name} ({len(result.source.shards)} shard(s), "
          f"{str(result.source.dtype).replace('torch.', '')}) -> {result.path}")
    print(f"  {config.num_hidden_layers} layers of width {config.hidden_size}, {config.num_attention_heads} heads "
          f"({config.num_key_value_heads} key/value), vocab {config.vocab_size}, [MASK] = {config.mask_token_id}"
          f"{', logits shifted inside the model' if config.shift_logits else ''}"
          f"{f', block diffusion in blocks of {config.diffusion_block_size}' if config.diffusion_block_size else ''}")
    for note in result.notes:
        print(f"  note: {note}")
    if not args.no_verify:
        print("  verified: every weight equals the source's byte for byte, the folder reloads cleanly, a forward pass is finite")


def _add_format_parsers(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, help_text, description in (
            ("mdlm", "MDLM (kuleshov-group/mdlm-owt): Hub layout folder or repo id, or a Lightning .ckpt",
             "Convert an MDLM checkpoint into a hub-ready hf_mdm folder with identical outputs."),
            ("bd3lm", "BD3-LM (kuleshov-group/bd3lm-owt-block_size4/8/16): Hub layout folder or repo id",
             "Convert a BD3-LM block-diffusion checkpoint (MDLM's DiT, block-causal) into a hub-ready hf_mdm folder.")):
        mdlm = formats.add_parser(name, help=help_text, description=description)
        mdlm.add_argument("src", metavar="SRC", help="Hub-layout folder, Hub repo id, or MDLM Lightning checkpoint file")
        mdlm.add_argument("dst", metavar="DST", help="output folder (empty or absent unless --overwrite)")
        mdlm.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id")
        mdlm.add_argument("--no-ema", action="store_true", help="Lightning: convert the raw weights, not the EMA")
        mdlm.add_argument("--n-heads", type=int, help="attention heads, when the source does not say")
        mdlm.add_argument("--model-length", type=int, help="context length, when the source does not say")
        mdlm.add_argument("--time-conditioning", type=_bool, metavar="{true,false}",
                          help="whether the network reads the noise level, when the source does not say")
        mdlm.add_argument("--mask-token-id", type=int,
                          help="[MASK] id (default: the run's tokenizer's mask token, else vocab_size - 1, as MDLM does)")
        mdlm.add_argument("--tokenizer", help="folder with tokenizer files to ship (default: SRC's own, if any)")
        mdlm.add_argument("--attend-to-padding", action="store_true",
                          help="attend to padding and ignore attention_mask, as MDLM's DiT does (default: padding masked)")
        mdlm.add_argument("--length-extrapolation", action="store_true",
                          help="run sequences longer than the training length with a warning, as MDLM's rotary DiT does "
                               "(default: refused)")
        mdlm.add_argument("--license", help="the card's Hub license id (default: the source card's, else 'other')")
        mdlm.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
        mdlm.add_argument("--no-verify", action="store_true", help="skip reloading DST to check its logits")
        mdlm.set_defaults(func=convert_mdlm_command, command_label=f"convert {name}", family=name)

    for name, title, example in (("llada", "LLaDA", "GSAI-ML/LLaDA-8B-Instruct"),
                                 ("dream", "Dream", "Dream-org/Dream-v0-Instruct-7B"),
                                 ("sdar", "SDAR / TraDo", "JetLM/SDAR-1.7B-Chat, Gen-Verse/TraDo-4B-Instruct"),
                                 ("fast-dllm-v2", "Fast-dLLM v2", "Efficient-Large-Model/Fast_dLLM_v2_1.5B"),
                                 ("llada-moe", "LLaDA-MoE", "inclusionAI/LLaDA-MoE-7B-A1B-Instruct"),
                                 ("rnd1", "RND1", "radicalnumerics/RND1-Base-0910"),
                                 ("llada2", "LLaDA 2.0 / 2.1", "inclusionAI/LLaDA2.0-mini")):
        family = formats.add_parser(
            name,
            help=f"{title} ({example}): Hub-layout folder or repo id, streamed shard by shard",
            description=f"Convert a {title} checkpoint into a hub-ready hf_mdm folder (MDMLlamaForMaskedDiffusion), "
                        "shard by shard, weights unchanged.",
        )
        family.add_argument("src", metavar="SRC", help=f"Hub-layout folder or Hub repo id (e.g. {example})")
        family.add_argument("dst", metavar="DST", help="output folder (empty or absent unless --overwrite)")
        family.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id")
        family.add_argument("--license", help="the card's Hub license id (default: the source card's, else 'other')")
        family.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (only once complete)")
        family.add_argument("--no-verify", action="store_true",
                            help="skip reloading DST to compare every weight with the source")
        family.set_defaults(func=convert_llama_family_command, command_label=f"convert {name}",
                            family=name.replace("-", "_"))


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `convert` (with its formats, e.g. `convert mdlm SRC DST`) to `hf-mdm`'s subparsers; sets `func`."""
    parser = subparsers.add_parser("convert", help=COMMANDS["convert"],
                                   description="Convert a checkpoint from another format into hf_mdm.")
    _add_format_parsers(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-mdm convert", description="Convert a checkpoint into hf_mdm.")
    _add_format_parsers(parser)
    args = parser.parse_args(argv)
    run_command(args.command_label, args.func, args)


if __name__ == "__main__":
    main(sys.argv[1:])
