"""The cost of one first-hitting step's network call: host reads in forward, and torch.compile.

Until issue 16, `forward` read tensor values on the host on every call (`int(input_ids.min())`,
`int(input_ids.max())`, `bool(attention_mask.all())`, and the min/max of `output_positions`): on a GPU each read
waits for the device to finish all queued work, once per sampling step. Now `forward` reads no values (they are
checked once per `generate()` call), so it also compiles with `fullgraph=True`. Per FHS step this measures, in one
run, with ratios (the machines are noisy; absolute times are for reference):

    (a) forward + the old per-call host reads  /  forward          what removing the reads gains
    (b) forward  /  torch.compile(forward, fullgraph=True)          what compiling gains
    (c) generate() per step, eager model  /  compiled model          (b) inside the whole sampling loop

The old reads are replayed exactly as the old forward made them, before the call. On the CPU a "read" is only a
reduction (no device to wait for), so (a) is near 1 there; it is on a GPU that (a) measures synchronisation.

    python benchmarks/forward_step.py                    # CPU, a few minutes (compilation included)
    python benchmarks/forward_step.py --device cuda
"""

import argparse

import torch

from hf_mdm import MDMConfig, MDMForMaskedDiffusion
from sampling import timed  # benchmarks/sampling.py: the same clock for every benchmark


def old_host_reads(input_ids, attention_mask, output_positions):
    """What the old forward read on the host before running (each forces a device synchronisation)."""
    int(input_ids.min()), int(input_ids.max())
    if attention_mask is not None:
        bool(attention_mask.all())
    int(output_positions.min()), int(output_positions.max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=32, help="positions generated in (c)")
    parser.add_argument("--padded", action="store_true", help="pass an attention mask with one padded row")
    args = parser.parse_args()
    device = args.device

    config = MDMConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, cond_dim=64, max_position_embeddings=args.length, dropout=0.0)
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model = model.eval().to(device)
    compiled = torch.compile(model, fullgraph=True)

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.mask_token_id, (args.batch, args.length), generator=generator)
    ids[torch.rand(ids.shape, generator=generator) < 0.5] = config.mask_token_id
    ids = ids.to(device)
    mask = None
    if args.padded:
        mask = torch.ones_like(ids)
        mask[0, : args.length // 4] = 0
    positions = torch.randint(0, args.length, (args.batch, 1), generator=generator).to(device)

    def eager_step():
        with torch.no_grad():
            return model(ids, attention_mask=mask, output_positions=positions).logits

    def eager_step_with_reads():
        old_host_reads(ids, mask, positions)
        return eager_step()

    def compiled_step():
        with torch.no_grad():
            return compiled(ids, attention_mask=mask, output_positions=positions).logits

    torch.testing.assert_close(compiled_step(), eager_step(), rtol=1e-4, atol=1e-4)
    t_reads = timed(eager_step_with_reads, args.repeats, device, warmups=2)
    t_eager = timed(eager_step, args.repeats, device, warmups=2)
    t_compiled = timed(compiled_step, args.repeats, device, warmups=2)

    # (c) generate() end to end: prompt of L - new_tokens, FHS one token per call, per step.
    prompt = ids[:, : args.length - args.new_tokens].clamp(max=config.mask_token_id - 1)

    def generate_with(network):
        def run():
            return network.generate(prompt, max_new_tokens=args.new_tokens, generator=torch.Generator(device).manual_seed(0))
        return run

    compiled_model = MDMForMaskedDiffusion(config).eval().to(device)
    compiled_model.load_state_dict(model.state_dict())
    compiled_model.forward = torch.compile(compiled_model.forward, fullgraph=True, dynamic=True)
    samples_eager, samples_compiled = generate_with(model)(), generate_with(compiled_model)()
    agreement = (samples_eager == samples_compiled).float().mean().item()
    t_generate_eager = timed(generate_with(model), max(args.repeats // 10, 3), device, warmups=2) / args.new_tokens
    t_generate_compiled = timed(generate_with(compiled_model), max(args.repeats // 10, 3), device, warmups=2) / args.new_tokens

    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, L {args.length}, V {args.vocab}, "
          f"{args.layers} layers of width {args.width}, {'one padded row' if args.padded else 'no padding'}")
    print(f"forward + old host reads : {1e3 * t_reads:8.3f} ms per step")
    print(f"forward                  : {1e3 * t_eager:8.3f} ms per step")
    print(f"compiled forward         : {1e3 * t_compiled:8.3f} ms per step")
    print(f"generate(), eager        : {1e3 * t_generate_eager:8.3f} ms per step")
    print(f"generate(), compiled     : {1e3 * t_generate_compiled:8.3f} ms per step "
          f"(samples identical at {100 * agreement:.1f}% of positions)")
    print(f"(a) reads removed: {t_reads / t_eager:.3f}x   (b) compiled: {t_eager / t_compiled:.3f}x   "
          f"(c) generate compiled: {t_generate_eager / t_generate_compiled:.3f}x")


if __name__ == "__main__":
    main()
