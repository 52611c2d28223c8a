"""`hf-mdm evaluate`: sample a checkpoint under a sweep of sampler settings and judge the samples.

    hf-mdm evaluate runs/owt/model --judge openai-community/gpt2-large --reference-files owt_valid.txt \\
        --samplers first_hitting ancestral --steps 256 1024 --sampling-dtypes float64 float32 \\
        --num-samples 256 --batch-size 32 --ar-model runs/owt-ar/model --ar-temperatures 0.8 0.9 1.0 \\
        --output-dir eval/owt

For every setting (and every AR temperature) it draws --num-samples samples of --length tokens, then reports
generative perplexity under the judge beside token entropy and, with reference texts, MAUVE, with the mean NFE
per sample and the wall time. Outputs: results.json, results.md (a Markdown table) and plot.png (gen PPL against
entropy). Settings are checked before anything is generated. Under `accelerate launch` the samples of each
setting are split across the processes and gathered on the main one, which computes the metrics.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from ..console import run_command
from ..constants import COMMANDS, DEFAULT_JUDGE, MDM_MODEL_TYPES
from ..pretrained import resolve_checkpoint
from ..sampling_mdm import STRATEGIES
from .sweep import SamplerSetting, expand_settings, parse_setting


GRID_DEFAULTS = dict(samplers=["first_hitting"], steps=[None], tokens_per_step=[1], sampling_dtypes=["float64"],
                     temperatures=[1.0])


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `evaluate` subcommand to an argparse subparsers object; its `func` runs the evaluation."""
    parser = subparsers.add_parser("evaluate", help=COMMANDS["evaluate"],
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_evaluate)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the MDM: a save_pretrained folder (e.g. a training run's model/) or a "
                        "shipped name (shakespeare-mdm)")
    parser.add_argument("--tokenizer", help="the MDM's tokenizer (default: the one in the checkpoint folder)")
    parser.add_argument("--output-dir", default="evaluation", help="where results.json, results.md and plot.png go")

    judge = parser.add_argument_group("judge and references")
    judge.add_argument("--judge", default=DEFAULT_JUDGE,
                       help="causal LM that scores and embeds samples: folder, Hub id or shipped name (shakespeare-ar)")
    judge.add_argument("--judge-batch-size", type=int, default=8, help="texts per judge forward pass")
    judge.add_argument("--judge-device", help="device of the judge (default: the generation device)")
    judge.add_argument("--reference-files", nargs="+", help="text or jsonl files of reference texts (for MAUVE, the "
                       "reference entropy and --nelbo); packed into blocks of --length MDM tokens")
    judge.add_argument("--reference-sample-by", default="paragraph", choices=("document", "paragraph", "line"),
                       help="what one document of a reference text file is")
    judge.add_argument("--text-field", default="text", help="the text field of jsonl reference files")
    judge.add_argument("--num-references", type=int,
                       help="reference blocks to use (default: --num-samples; 0: all)")
    judge.add_argument("--nelbo", action="store_true", help="also the MDM's NELBO and perplexity bound on the references")
    judge.add_argument("--nelbo-passes", type=int, default=1, help="noise draws per reference block for --nelbo")
    judge.add_argument("--skip-special-tokens", action="store_true",
                       help="drop special tokens (EOS, ...) when decoding samples (default: keep them, as MDLM does)")

    sweep = parser.add_argument_group("sampler settings: the cross product of these, or --setting")
    sweep.add_argument("--samplers", nargs="+", help=f"registered strategies: {', '.join(STRATEGIES)} (default: "
                       "first_hitting)")
    sweep.add_argument("--steps", nargs="+", type=int, help="ancestral samplers: time steps (default: one per token)")
    sweep.add_argument("--tokens-per-step", nargs="+", type=int, help="first_hitting: tokens per network call (default: 1)")
    sweep.add_argument("--sampling-dtypes", nargs="+", help="float64, float32, bfloat16, float16 (default: float64)")
    sweep.add_argument("--temperatures", nargs="+", type=float, help="(default: 1.0)")
    sweep.add_argument("--setting", action="append", default=[], metavar="FIELD=VALUE,...",
                       help="one setting: a strategy, its settings and generation fields, e.g. sampler=ancestral,"
                       "steps=256,sampling_dtype=float32 or sampler=confidence,order=margin,steps=64 (repeatable)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num-samples", type=int, default=64, help="samples per setting")
    sampling.add_argument("--batch-size", type=int, default=8, help="samples per generate() call (per process)")
    sampling.add_argument("--length", type=int, help="tokens per sample (default: the MDM's max_position_embeddings)")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--save-samples", action="store_true", help="also write the decoded samples to samples.jsonl, each with its own gen PPL "
                          "(None if it has fewer than two judge tokens) and token entropy")

    ar = parser.add_argument_group("autoregressive baseline")
    ar.add_argument("--ar-model", help="any causal LM folder or Hub id, or a shipped name (shakespeare-ar), sampled "
                    "with its own generate()")
    ar.add_argument("--ar-tokenizer", help="its tokenizer (default: the one with the model)")
    ar.add_argument("--ar-temperatures", nargs="+", type=float, default=[1.0], help="one AR row per temperature")


def sampler_settings(args: argparse.Namespace) -> list[SamplerSetting]:
    """The grid (when any grid flag is given, or no --setting) followed by each --setting; validated."""
    grid_flags = {name: getattr(args, name) for name in GRID_DEFAULTS}
    settings = []
    if any(value is not None for value in grid_flags.values()) or not args.setting:
        grid = {name: value if value is not None else GRID_DEFAULTS[name] for name, value in grid_flags.items()}
        settings = expand_settings(**grid)
    for text in args.setting:
        setting = parse_setting(text)
        if setting not in settings:
            settings.append(setting)
    return settings


def check_arguments(args: argparse.Namespace) -> list[SamplerSetting]:
    """Every check that needs no model: bad settings and missing files fail here, before any generation. Names of
    checkpoints shipped in hf_mdm (the checkpoint, --judge, --ar-model and the tokenizers) become their folders."""
    settings = sampler_settings(args)
    for name in ("num_samples", "batch_size", "judge_batch_size", "nelbo_passes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.length is not None and args.length < 2:
        raise ValueError(f"--length must be >= 2, got {args.length}.")
    if args.num_references is not None and args.num_references < 0:
        raise ValueError(f"--num-references must be >= 0 (0: all), got {args.num_references}.")
    if not all(math.isfinite(t) and t >= 0 for t in args.ar_temperatures):
        raise ValueError(f"--ar-temperatures must be finite numbers >= 0 (0 is greedy), got {args.ar_temperatures}.")
    if args.nelbo and not args.reference_files:
        raise ValueError("--nelbo evaluates the MDM on reference texts: give --reference-files.")
    if args.reference_files:
        from ..training.data import check_text_files

        check_text_files(args.reference_files, args.text_field)
        try:
            import mauve  # noqa: F401  (mauve-text)
        except ImportError:
            raise ValueError("MAUVE against --reference-files needs the mauve-text package: pip install mauve-text") from None
    # After the settings (cheap, and the likeliest mistake): the checkpoints, each a folder, Hub id or shipped name.
    for name in ("checkpoint", "tokenizer", "judge", "ar_model", "ar_tokenizer"):
        if getattr(args, name) is not None:
            setattr(args, name, resolve_checkpoint(getattr(args, name), require_mdm=name == "checkpoint"))
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint {args.checkpoint!r} is not a folder (a save_pretrained folder of an MDM).")
    return settings


def warm_up(model, ar_model=None, start_id=None) -> None:
    """One tiny untimed generation per model, so that one-off start-up costs (kernels, allocator) do not land in
    the wall time of the first setting."""
    import torch

    model.generate(max_new_tokens=2, num_return_sequences=1, generator=torch.Generator(model.device).manual_seed(0))
    if ar_model is not None:
        prompt = torch.full((1, 1), start_id, dtype=torch.long, device=ar_model.device)
        ar_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
                          pad_token_id=start_id)


def judge_label(name: str) -> str:
    """A short name for a judge: a Hub id as it is, a folder by its last two parts ("judge/model")."""
    path = Path(name)
    return "/".join(path.parts[-2:]) if path.exists() else name


def run_evaluate(args: argparse.Namespace) -> dict | None:
    """Runs the evaluation; returns the results (on the main process; None on the others)."""
    from ..distributed import make_accelerator
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from . import load_judge, load_metric, load_text_blocks
    from .judge import judge_features, model_context
    from .report import KIND_NAMES, markdown_table, plot_results
    from .sweep import ar_sampler, generate_samples, mdm_sampler

    # 1. Check everything that can be checked without a model, then load (the judge first: it is the likeliest to
    #    be missing, and only the main process needs it).
    settings = check_arguments(args)
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    output_dir = Path(args.output_dir)
    judge = load_judge(args.judge, args.judge_device or accelerator.device) if main else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.checkpoint)
    except (OSError, ValueError) as error:
        raise ValueError(f"no tokenizer in {args.checkpoint!r} ({error}); pass --tokenizer.") from None
    model = AutoModel.from_pretrained(args.checkpoint).to(accelerator.device).eval()
    length = args.length or model.config.max_position_embeddings
    if length > model.config.max_position_embeddings:
        raise ValueError(f"--length {length} exceeds the MDM's max_position_embeddings ({model.config.max_position_embeddings}).")
    ar_model = ar_tokenizer = None
    if args.ar_model:
        ar_tokenizer = AutoTokenizer.from_pretrained(args.ar_tokenizer or args.ar_model)
        ar_model = AutoModelForCausalLM.from_pretrained(args.ar_model).to(accelerator.device).eval()
        if ar_model.config.model_type in MDM_MODEL_TYPES:
            raise ValueError(f"--ar-model {args.ar_model!r} is a masked diffusion model; the baseline must be "
                             "autoregressive.")
        start_id = ar_tokenizer.bos_token_id if ar_tokenizer.bos_token_id is not None else ar_tokenizer.eos_token_id
        if start_id is None:
            raise ValueError(f"the AR tokenizer {args.ar_model!r} has neither a BOS nor an EOS token to start samples from.")
        ar_context = model_context(ar_model.config)
        if ar_context is not None and length > ar_context:
            raise ValueError(f"--length {length} exceeds the AR model's context ({ar_context}).")
    reference_blocks = None
    if args.reference_files and main:
        count = args.num_samples if args.num_references is None else args.num_references  # 0: all
        reference_blocks = load_text_blocks(args.reference_files, tokenizer, length, count, args.text_field,
                                            args.reference_sample_by)

    # 2. Generate every set of samples (all processes; each set gathered on every process).
    sample_sets = []
    block_model = getattr(model.config, "diffusion_block_size", None) is not None
    jobs = [("mdm", setting.describe(block_model), setting, mdm_sampler(model, setting, length, show_progress=main))
            for setting in settings]
    if ar_model is not None:
        jobs += [("ar", f"T={t:g}", {"temperature": t}, ar_sampler(ar_model, start_id, t, length))
                 for t in args.ar_temperatures]
    warm_up(model, ar_model, start_id if ar_model is not None else None)
    for kind, label, setting, sample_batch in tqdm(jobs, desc="settings", disable=not main):
        samples = generate_samples(sample_batch, args.num_samples, args.batch_size, accelerator, args.seed,
                                   desc=f"{KIND_NAMES[kind]} {label}")
        sample_sets.append((kind, label, setting, samples))
    if not main:
        return None

    # 3. Judge them (main process), through the evaluate modules.
    gen_ppl = load_metric("generative_perplexity", keep_in_memory=True)
    entropy = load_metric("token_entropy", keep_in_memory=True)
    mauve = load_metric("mauve", keep_in_memory=True) if reference_blocks is not None else None

    def decode(ids, kind_tokenizer):
        return kind_tokenizer.batch_decode(ids.tolist(), skip_special_tokens=args.skip_special_tokens)

    def judge_row(kind, label, setting, token_ids, texts, samples=None):
        """The row of one set of samples, and each sample's own figures (its gen PPL and token entropy)."""
        ppl = gen_ppl.compute(predictions=texts, judge=judge, batch_size=args.judge_batch_size)
        entropies = entropy.compute(predictions=token_ids.tolist())
        row = dict(kind=kind, label=label, setting=setting, num_samples=len(texts),
                   nfe_per_sample=samples.nfe.double().mean().item() if samples is not None else None,
                   seconds=samples.seconds if samples is not None else None,
                   generative_perplexity=ppl["generative_perplexity"], gen_ppl_excluded=len(ppl["excluded"]),
                   token_entropy=entropies["token_entropy"], mauve=None)
        if mauve is not None and kind != "reference":
            row["mauve"] = mauve.compute(predictions=texts, reference_features=reference_features, judge=judge,
                                         batch_size=args.judge_batch_size, seed=args.seed)["mauve"]
        return row, [dict(gen_ppl=g, token_entropy=h) for g, h in zip(ppl["per_sample"], entropies["per_sample"])]

    rows, saved_samples = [], []
    reference_features, footnotes = None, []
    if reference_blocks is not None:
        reference_texts = decode(reference_blocks, tokenizer)
        reference_features = judge_features(reference_texts, judge, args.judge_batch_size)[0]
        rows.append(judge_row("reference", "reference texts", None, reference_blocks, reference_texts)[0])
    for kind, label, setting, samples in tqdm(sample_sets, desc="judging"):
        texts = decode(samples.sequences, tokenizer if kind == "mdm" else ar_tokenizer)
        setting_fields = setting.generation_kwargs() if kind == "mdm" else setting
        row, per_sample = judge_row(kind, label, setting_fields, samples.sequences, texts, samples)
        rows.append(row)
        saved_samples += [dict(kind=kind, label=label, text=text, **figures) for text, figures in zip(texts, per_sample)]
    nelbo = None
    if args.nelbo:
        nelbo = load_metric("mdm_nelbo", keep_in_memory=True).compute(
            predictions=reference_blocks.tolist(), model=model, num_passes=args.nelbo_passes, seed=args.seed,
            batch_size=args.batch_size, device=accelerator.device)
        footnotes.append(f"MDM NELBO on the {nelbo['num_blocks']} reference blocks: {nelbo['nelbo']:.4f} nats/token, "
                         f"perplexity bound {nelbo['perplexity_bound']:.2f}.")
    footnotes.append(f"{length} tokens per sample; entropy in each model's own tokens (nats); seed {args.seed}; "
                     f"{accelerator.num_processes} process(es) on {accelerator.device.type}.")

    # 4. Write results.json, results.md and plot.png.
    results = dict(checkpoint=str(args.checkpoint), judge=judge.name, length=length, num_samples=args.num_samples,
                   seed=args.seed, num_processes=accelerator.num_processes, nelbo=nelbo, rows=rows,
                   arguments={k: v for k, v in vars(args).items() if k != "func"})
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(rows, judge_label(judge.name), footnotes)
    (output_dir / "results.md").write_text(table)
    plot_results(rows, output_dir / "plot.png", judge_label(judge.name))
    if args.save_samples:
        with (output_dir / "samples.jsonl").open("w") as handle:
            handle.writelines(json.dumps(sample) + "\n" for sample in saved_samples)
    print(table)
    print(f"wrote {output_dir / 'results.json'}, {output_dir / 'results.md'} and {output_dir / 'plot.png'}")
    return results


def main(argv: list[str] | None = None) -> dict | None:
    """`python -m hf_mdm.evaluation.cli CHECKPOINT ...` (the same flags as `hf-mdm evaluate`)."""
    parser = argparse.ArgumentParser(prog="hf-mdm evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command("evaluate", run_evaluate, parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
