"""The `hf-mdm` command line: demo, train, evaluate, convert."""

import argparse
import sys
import tempfile
import time


class DraftPrinter:
    """A streamer that redraws prompt + draft in place as positions are unmasked ([MASK] shown as '_').

    generate() calls put() first with the prompt, then with the generated region after every step."""

    def __init__(self, decode):
        self.decode, self.prompt = decode, None

    def put(self, value):
        text = self.decode(value[0].tolist())
        if self.prompt is None:
            self.prompt = text
        else:
            print("\r\033[K" + (self.prompt + text)[-110:], end="", flush=True)

    def end(self):
        print()


def demo(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModel

    from hf_mdm import MDMConfig, MDMForMaskedDiffusion

    print("No trained default ships yet: this demo uses a SMALL RANDOMLY INITIALISED byte-level model, so the text")
    print("below is noise. It shows the machinery: save, reload with AutoModel, exact first-hitting sampling.\n")
    torch.manual_seed(args.seed)
    config = MDMConfig(vocab_size=257, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, cond_dim=64,
                       max_position_embeddings=args.length)
    model = MDMForMaskedDiffusion(config)
    with torch.no_grad():  # adaLN-zero init would give uniform predictions; random weights give a visible draft
        for param in model.parameters():
            param.normal_(0, 0.1)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        model = AutoModel.from_pretrained(folder)
    print(f"AutoModel.from_pretrained -> {type(model).__name__}, {model.num_parameters() / 1e6:.2f} M parameters")

    def decode(ids):
        return "".join("_" if i == config.mask_token_id else (chr(i) if 32 <= i < 127 else ".") for i in ids)

    for title, prompt in (("unconditional", None), ("from a prompt", torch.tensor([list(b"To be, or not")]))):
        print(f"\n[{title}] sampler=first_hitting, sampling_dtype=float64")
        streamer = DraftPrinter(decode)
        start = time.perf_counter()
        new_tokens = args.length - (0 if prompt is None else prompt.shape[1])
        out = model.generate(prompt, max_new_tokens=new_tokens,
                             generator=torch.Generator().manual_seed(args.seed), streamer=streamer,
                             return_dict_in_generate=True)
        seconds = time.perf_counter() - start
        print(f"NFE = {out.nfe} network calls for {new_tokens} generated tokens, {seconds:.2f} s")


def main(argv: list[str] | None = None) -> None:
    from hf_mdm.convert.cli import add_convert_parser
    from hf_mdm.evaluation.cli import add_evaluate_parser
    from hf_mdm.training.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="hf-mdm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="generate from the default model")
    demo_parser.add_argument("--length", type=int, default=64)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(func=demo)
    add_train_parser(commands)
    add_evaluate_parser(commands)
    add_convert_parser(commands)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:  # bad input: one clear line, not a traceback
        parser.exit(2, f"hf-mdm {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
