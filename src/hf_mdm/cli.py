"""The `hf-mdm` command line: demo, generate, train, evaluate, convert."""

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


def generate(args: argparse.Namespace) -> None:
    """Samples from a checkpoint folder (or Hub id) with its own tokenizer, streaming the draft when there is one sample."""
    import torch
    from transformers import AutoModel, AutoTokenizer, TextDiffusionStreamer

    from hf_mdm import MDMGenerationConfig  # also registers "mdm" with the Auto classes

    settings = {k: v for k, v in dict(sampler=args.sampler, steps=args.steps, tokens_per_step=args.tokens_per_step,
                                      sampling_dtype=args.sampling_dtype, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p).items() if v is not None}
    MDMGenerationConfig(**settings)  # bad settings fail here, before the model is loaded
    model = AutoModel.from_pretrained(args.checkpoint).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.checkpoint)
    prompt = None
    if args.prompt:
        prompt = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(args.device)
    stream = args.num_samples == 1 and not args.no_stream
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples,
                         generator=torch.Generator().manual_seed(args.seed), return_dict_in_generate=True,
                         streamer=TextDiffusionStreamer(tokenizer) if stream else None, **settings)
    seconds = time.perf_counter() - start
    if not stream:
        for i, text in enumerate(tokenizer.batch_decode(out.sequences, skip_special_tokens=False)):
            print(f"--- sample {i}\n{text}")
    generated = out.sequences.shape[1] - (0 if prompt is None else prompt.shape[1])
    print(f"NFE = {out.nfe} network calls for {generated} tokens x {args.num_samples} sample(s); "
          f"{seconds / args.num_samples:.2f} s per sample")


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
    gen = commands.add_parser("generate", help="sample from a checkpoint (first-hitting, float64 by default)")
    gen.add_argument("checkpoint", help="a saved hf_mdm folder or Hub id, with its tokenizer")
    gen.add_argument("--prompt", default=None, help="a prefix; without it, unconditional samples")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: fill the model's context")
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--sampler", default=None, help="first_hitting (default), ancestral, ancestral_cache")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--tokens-per-step", type=int, default=None)
    gen.add_argument("--sampling-dtype", default=None, help="float64 (default), float32, bfloat16, float16")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", default=None, help="default: the checkpoint's own")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--no-stream", action="store_true", help="print only the final text")
    gen.set_defaults(func=generate)
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
