"""The training loop: one Accelerate loop for masked diffusion models and for the autoregressive baseline.

Reads top to bottom like nanoGPT's train.py: settings, set-up (processes, tokenizer, model, data, optimizer),
then the loop with its "once in a while" blocks for logging, validation and checkpoints, then the final save.
The same code runs on one CPU, one GPU, or many under `accelerate launch` / `torchrun` (DDP, FSDP, DeepSpeed).

Batches are global: `batch_size` sequences per optimizer step over all processes and accumulation micro-steps.
Row i of the global batch of step s is the same block with the same noise however many processes share it, so a
run on 2 processes follows a run on 1 (up to float summation order, and dropout, whose RNG is per process).
"""

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from ..distributed import make_accelerator
from ..files import FolderLock
from ..pretrained import resolve_checkpoint

from .checkpointing import (check_output_dir, latest_checkpoint, load_checkpoint, remove_temp_checkpoints,
                            save_checkpoint, write_run_config)
from .chat_data import chat_examples, read_conversations
from .data import BlockSampler, load_documents, split_documents, tokenize_and_pack
from .ema import EMA
from .from_autoregressive import adapt_causal_lm, add_mask_token, causal_lm_type
from .models import build_model, build_model_config
from .objectives import OBJECTIVES, get_objective, validation_loss
from .tokenizer import check_special_tokens, train_bpe_tokenizer


# Validation noise is fixed by this seed, not by the run's seed, so that validation losses of different runs
# are measured on the very same masks and times.
VALIDATION_SEED = 0
MIXED_PRECISION = ("no", "bf16", "fp16")


def setting(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Every setting of a run. The CLI flags are these fields (`--block-size` for `block_size`)."""

    # data
    train_files: list[str] | None = setting(None, "text (.txt) or jsonl (.jsonl) files to train on")
    validation_files: list[str] | None = setting(None, "held-out files; default: hold out --validation-fraction "
                                                 "of the documents")
    dataset_name: str | None = setting(None, "a `datasets` dataset name or local folder, instead of --train-files")
    dataset_config: str | None = setting(None, "the dataset's configuration name")
    text_field: str = setting("text", "the text column of jsonl files and datasets")
    sample_by: str = setting("paragraph", "what a document is in a text file", choices=("document", "paragraph", "line"))
    validation_fraction: float = setting(0.05, "fraction of documents held out when no --validation-files are given")
    block_size: int = setting(128, "tokens per training sequence (documents are packed, EOS between them)")
    num_proc: int | None = setting(None, "processes for tokenization")
    # tokenizer
    tokenizer: str | None = setting(None, "a Hugging Face tokenizer (folder or Hub name)")
    train_tokenizer: int | None = setting(None, "instead: train a byte-level BPE of this vocabulary size on --train-files")
    add_mask_token: bool = setting(False, "add '[MASK]' to a tokenizer that lacks a mask token")
    # chat data (objective sft)
    messages_field: str = setting("messages", "sft: the jsonl field holding a conversation's messages")
    prompt_field: str | None = setting(None, "sft: instead of messages, the prompt field of each jsonl row")
    response_field: str | None = setting(None, "sft: with --prompt-field, the response field")
    # model and objective
    objective: str = setting("mdm", "mdm: continuous-time NELBO; mdm-discrete: NELBO over the number of masked "
                             "tokens; sft: the NELBO of chat responses given their prompts; ar: next-token loss of a "
                             "causal LM", choices=tuple(OBJECTIVES))
    model_config: str | None = setting(None, "a preset (mdm: tiny, mini, mdlm-owt; ar: gpt2-tiny, gpt2-mini, "
                                       "llama-tiny, gpt2-small) or a JSON file of config fields; default tiny")
    init_from: str | None = setting(None, "start from this model (a shipped name, a folder or a Hub id): its config "
                                    "and tokenizer are used (no --model-config, --tokenizer, --train-tokenizer); a "
                                    "GPT-2/Llama/Mistral/Qwen2/Qwen3 causal LM is adapted into diffusion, [MASK] added")
    diffusion_block_size: int | None = setting(None, "block diffusion (BD3-LM): attention bidirectional inside blocks "
                                               "of this many tokens and causal across them, trained with BD3-LM's "
                                               "NELBO (objective mdm or sft); default: a bidirectional MDM")
    gradient_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass: less "
                                           "memory, same gradients, ~30% more compute")
    # LoRA (peft, `pip install hf_mdm[peft]`)
    lora_r: int = setting(0, "LoRA rank; 0 trains every weight")
    lora_alpha: float | None = setting(None, "LoRA scale numerator (default: 2 x --lora-r)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch")
    lora_target_modules: list[str] | None = setting(None, "module names LoRA adapts (default: every attention and MLP "
                                                   "projection of the backbone)")
    lora_target_parameters: list[str] | None = setting(None, "stacked expert weights LoRA adapts (default: every MoE "
                                                        "layer's mlp.experts.gate_up_proj and down_proj; none for a "
                                                        "dense model)")
    # optimisation
    batch_size: int = setting(32, "GLOBAL batch: sequences per optimizer step, over all processes and micro-steps")
    grad_accum: int = setting(1, "accumulation micro-steps per optimizer step")
    lr: float = setting(3e-4, "peak learning rate (AdamW)")
    min_lr: float = setting(3e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = setting(100, "linear warmup from 0 to --lr")
    decay_steps: int | None = setting(None, "length of warmup + cosine decay; default: --max-steps")
    weight_decay: float = setting(0.0, "AdamW weight decay on matrices (MDLM: 0)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.999, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm at this value (0: off)")
    ema_decay: float = setting(0.0, "EMA of the weights used for validation and the final model (0: off; MDLM: 0.9999)")
    max_steps: int = setting(1000, "optimizer steps to train for (may be raised when resuming)")
    mixed_precision: str = setting("no", "autocast dtype", choices=MIXED_PRECISION)
    seed: int = setting(0, "seeds the weights, the data order and the noise")
    # evaluation, logging, checkpoints
    eval_every: int = setting(100, "validate every N steps (and at the end)")
    eval_blocks: int | None = setting(None, "validate on the first N held-out blocks only (default: all)")
    eval_passes: int = setting(1, "noise draws per held-out block (more: less variance)")
    log_every: int = setting(10, "log the training loss every N steps")
    save_every: int = setting(500, "write a checkpoint every N steps (0: only at the end)")
    save_total_limit: int = setting(2, "checkpoints kept (the newest ones)")
    output_dir: str = setting("runs/mdm", "where checkpoints, logs and the final model go")
    resume: bool = setting(False, "continue from the latest complete checkpoint in --output-dir")
    report_to: list[str] = setting((), "extra Accelerate trackers (tensorboard, wandb, ...)")


# Settings that may differ when a run is resumed: how long it trains and how often it logs, validates and saves.
MAY_CHANGE_ON_RESUME = {"max_steps", "eval_every", "eval_blocks", "log_every", "save_every", "save_total_limit",
                        "resume", "report_to", "num_proc",
                        # what a run that diverged resumes with: a smaller learning rate, gradient clipping
                        "lr", "min_lr", "grad_clip"}


class JSONLinesTracker(GeneralTracker):
    """An Accelerate tracker that appends `{"step": s, ...}` lines to a file: logs that tests and scripts can read."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")


def set_diffusion_block_size(model, block_size: int) -> None:
    """Makes a loaded MDM block-causal (BD3-LM fine-tunes a bidirectional MDLM this way); its generation config then
    decodes its blocks (block_length is the model's block size unless set smaller)."""
    config = model.config
    if not hasattr(config, "diffusion_block_size"):
        raise ValueError(f"--diffusion-block-size: {type(model).__name__} is not an hf_mdm masked diffusion model.")
    if block_size > config.max_position_embeddings:
        raise ValueError(f"--diffusion-block-size {block_size} does not fit the model's context "
                         f"(max_position_embeddings={config.max_position_embeddings}).")
    config.diffusion_block_size = block_size
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.block_length is not None and block_size % generation.block_length:
        generation.block_length = None


def initial_model(config: TrainConfig, tokenizer):
    """--init-from: an hf_mdm model (made block-causal by --diffusion-block-size: BD3-LM fine-tunes MDLM so), or an
    autoregressive causal LM adapted into one (SDAR's and Fast-dLLM v2's recipe, `from_autoregressive`)."""
    folder = resolve_checkpoint(config.init_from)
    if causal_lm_type(folder) is not None:
        return adapt_causal_lm(folder, tokenizer, config.diffusion_block_size)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    if config.diffusion_block_size is not None:
        set_diffusion_block_size(model, config.diffusion_block_size)
    return model


def check_settings(config: TrainConfig, num_processes: int) -> int:
    """Raises ValueError for settings that cannot work; returns the per-process micro-batch size."""
    if (config.train_files is None) == (config.dataset_name is None):
        raise ValueError("Give either --train-files or --dataset-name.")
    if config.init_from is not None:
        given = [f"--{name.replace('_', '-')}" for name in ("model_config", "tokenizer", "train_tokenizer")
                 if getattr(config, name) is not None]
        if given:
            raise ValueError(f"--init-from uses the model's own config and tokenizer: drop {', '.join(given)}.")
        if config.objective == "ar":
            raise ValueError("--init-from starts from an hf_mdm model; the AR baseline trains from scratch.")
    elif (config.tokenizer is None) == (config.train_tokenizer is None):
        raise ValueError("Give either --tokenizer or --train-tokenizer VOCAB_SIZE (or --init-from a model).")
    if config.objective == "sft" and config.dataset_name is not None:
        raise ValueError("--objective sft reads chat jsonl files: give --train-files.")
    if (config.prompt_field is None) != (config.response_field is None):
        raise ValueError("--prompt-field and --response-field go together.")
    if config.lora_r < 0 or (config.lora_r == 0 and (config.lora_alpha is not None or config.lora_target_modules
                                                     or config.lora_target_parameters)):
        raise ValueError("--lora-alpha, --lora-target-modules and --lora-target-parameters need --lora-r >= 1.")
    if config.lora_r and config.objective == "ar":
        raise ValueError("--lora-r adapts an MDM; the AR baseline trains fully.")
    if config.lora_r and config.init_from is None:
        raise ValueError("--lora-r adapts a trained model, and this run builds one from scratch (random weights): give "
                         "--init-from MODEL, or leave out --lora-r to train every weight.")
    if config.train_tokenizer is not None and config.train_files is None:
        raise ValueError("--train-tokenizer learns from --train-files; with --dataset-name give --tokenizer.")
    if config.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {tuple(OBJECTIVES)}, got {config.objective!r}.")
    if config.diffusion_block_size is not None:
        if isinstance(config.diffusion_block_size, bool) or not isinstance(config.diffusion_block_size, int) \
                or config.diffusion_block_size < 1:
            raise ValueError(f"--diffusion-block-size must be a positive integer, got {config.diffusion_block_size!r}.")
        if config.objective not in ("mdm", "sft"):
            raise ValueError(f"--diffusion-block-size trains with BD3-LM's NELBO: --objective mdm or sft, not "
                             f"{config.objective!r}.")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision must be one of {MIXED_PRECISION}, got {config.mixed_precision!r}.")
    for name in ("block_size", "batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "save_total_limit",
                 "eval_passes"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}.")
    if config.warmup_steps < 0 or config.save_every < 0:
        raise ValueError("--warmup-steps and --save-every must not be negative.")
    if config.eval_blocks is not None and config.eval_blocks < 1:
        raise ValueError(f"--eval-blocks must be at least 1 (or left out: every held-out block), got {config.eval_blocks}.")
    if not config.lr > 0:
        raise ValueError(f"--lr must be > 0, got {config.lr} (to evaluate without training, use hf-mdm evaluate).")
    if not 0 <= config.min_lr <= config.lr:
        raise ValueError(f"--min-lr must lie in [0, --lr = {config.lr}], got {config.min_lr}.")
    if config.grad_clip < 0:
        raise ValueError(f"--grad-clip must be > 0, or 0 for no clipping; got {config.grad_clip}.")
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA device (float16 autocast and its loss scaler); on the "
                         "CPU use bf16 or no.")
    trackers = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",)}
    for tracker in config.report_to:
        if tracker in trackers and not any(importlib.util.find_spec(name) for name in trackers[tracker]):
            raise ValueError(f"--report-to {tracker}: the {tracker} package is not installed (pip install "
                             f"{trackers[tracker][0]}).")
    shards = num_processes * config.grad_accum
    if config.batch_size % shards:
        raise ValueError(
            f"The global --batch-size {config.batch_size} does not divide across {num_processes} process(es) x "
            f"{config.grad_accum} accumulation step(s) = {shards} micro-batches. Use a multiple of {shards}."
        )
    return config.batch_size // shards


def learning_rate_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `decay_steps`, then flat (nanoGPT's get_lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def load_tokenizer(config: TrainConfig, output_dir: Path, accelerator: Accelerator):
    """The run's tokenizer, saved under output_dir/tokenizer (trained there by the main process if asked)."""
    saved = output_dir / "tokenizer"
    with accelerator.main_process_first():  # the main process trains and saves; the others then read its copy
        if config.init_from is not None:
            tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(config.init_from))
            if causal_lm_type(resolve_checkpoint(config.init_from)) is not None and add_mask_token(tokenizer):
                accelerator.print(f"the causal LM's tokenizer has no mask token: added {tokenizer.mask_token!r} "
                                  f"(id {tokenizer.mask_token_id})")
        elif config.tokenizer is not None:
            tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(config.tokenizer))
        elif (saved / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(saved)  # trained by the main process, or before a resume
        else:
            tokenizer = train_bpe_tokenizer(config.train_files, vocab_size=config.train_tokenizer,
                                            text_field=config.text_field)
        check_special_tokens(tokenizer, needs_mask=config.objective != "ar", add_mask_token=config.add_mask_token)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(saved)
    return tokenizer


def load_blocks(config: TrainConfig, tokenizer, accelerator: Accelerator):
    """(train, validation) packed blocks, or with objective sft chat examples (`chat_data`); the main process
    tokenizes first and the others read its cache."""
    if config.objective == "sft":
        return load_chat_examples(config, tokenizer)
    with accelerator.main_process_first():
        documents = load_documents(config.train_files, config.dataset_name, config.dataset_config,
                                   text_field=config.text_field, sample_by=config.sample_by)
        if config.validation_files:
            validation = load_documents(config.validation_files, text_field=config.text_field, sample_by=config.sample_by)
        else:
            # The held-out documents depend on VALIDATION_SEED, not on the run's seed: comparable across runs.
            documents, validation = split_documents(documents, config.validation_fraction, VALIDATION_SEED)
        pack = dict(tokenizer=tokenizer, block_size=config.block_size, text_field=config.text_field,
                    num_proc=config.num_proc)
        train_blocks, validation_blocks = tokenize_and_pack(documents, **pack), tokenize_and_pack(validation, **pack)
    if len(validation_blocks) == 0:
        raise ValueError(f"The validation split holds fewer tokens than one block of {config.block_size}.")
    return train_blocks, validation_blocks


def load_chat_examples(config: TrainConfig, tokenizer):
    """(train, validation) chat examples of `block_size` tokens with their `prompt_length`."""
    fields = dict(messages_field=config.messages_field, prompt_field=config.prompt_field,
                  response_field=config.response_field)
    conversations = read_conversations(config.train_files, **fields)
    if config.validation_files:
        validation = read_conversations(config.validation_files, **fields)
    else:  # held out by VALIDATION_SEED, as documents are
        order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
        held_out = max(1, round(config.validation_fraction * len(conversations)))
        if held_out >= len(conversations):
            raise ValueError(f"Cannot hold out validation conversations from {len(conversations)}: give --validation-files.")
        validation = [conversations[i] for i in order[:held_out]]
        conversations = [conversations[i] for i in order[held_out:]]
    return (chat_examples(conversations, tokenizer, config.block_size),
            chat_examples(validation, tokenizer, config.block_size))


BLOCK_PROJECTION = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.(\w+)$")


def default_lora_targets(model) -> list[str]:
    """Every attention and MLP projection of the backbone's blocks (`layers.N.self_attn.*`, `layers.N.mlp.*`): the
    DiT's qkv_proj, o_proj, fc_in, fc_out; the Llama family's q/k/v/o and gate/up/down projections; whatever a new
    family names its own."""
    return sorted({match.group(1) for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and (match := BLOCK_PROJECTION.search(name))})


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant: the same gradients, and it works with
    frozen inputs under LoRA)."""
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def default_lora_parameters(model) -> list[str]:
    """The stacked expert weights of a mixture of experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`),
    which LoRA adapts as parameters (peft's target_parameters): a rank-r update per expert. None in a dense model."""
    return sorted({name.split(".layers.")[-1].split(".", 1)[1] for name, _ in model.named_parameters()
                   if re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", name)})


def apply_lora(model, config: TrainConfig):
    """The model wrapped by peft's LoRA; a target that matches no module is an error naming it."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora-r needs the peft package: pip install 'hf_mdm[peft]'.") from None
    targets = config.lora_target_modules or default_lora_targets(model)
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ValueError(f"--lora-target-modules {target!r} matches no module of the model (its linear layers: "
                             f"{sorted({n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})}).")
    parameters = config.lora_target_parameters or default_lora_parameters(model)
    for target in parameters:
        if not any(name.endswith("." + target) for name, _ in model.named_parameters()):
            raise ValueError(f"--lora-target-parameters {target!r} matches no parameter of the model (its stacked "
                             f"expert weights: {default_lora_parameters(model) or 'none'}).")
    if parameters and config.lora_dropout:
        raise ValueError(f"--lora-dropout {config.lora_dropout} cannot apply to stacked expert weights (peft's "
                         "parameter LoRA has no dropout): use --lora-dropout 0, or --lora-target-parameters to choose.")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r, lora_dropout=config.lora_dropout,
                      target_modules=targets, target_parameters=parameters or None, bias="none")
    return get_peft_model(model, lora)


class InputError(ValueError):
    """Bad input (data, tokenizer, model config, settings, output directory), found before training starts."""


class TrainingDiverged(ValueError):
    """A non-finite loss, gradient norm or weight: training stops before it reaches an update or a checkpoint."""


def check_step_is_finite(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, output_dir: Path) -> None:
    """Raises TrainingDiverged, naming the step, unless this step's loss and global gradient norm are finite (one
    host read per step). The update is not made, so the last checkpoint (if any) stays the run's last good state."""
    if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
        return
    last = latest_checkpoint(output_dir)
    raise TrainingDiverged(
        f"step {step}: the loss is {float(loss):.4g} and the gradient norm {float(grad_norm):.4g}: training stops "
        f"before updating the weights. {f'The last checkpoint, {last.name}, is intact: resume from it' if last else 'No checkpoint was written: restart'} "
        "with a smaller --lr or with --grad-clip."
    )


def check_weights_are_finite(model, step: int) -> None:
    """Raises TrainingDiverged when a weight is NaN or infinite: nothing non-finite is ever written to disk."""
    bad = [name for name, parameter in model.named_parameters() if not bool(torch.isfinite(parameter).all())]
    if bad:
        raise TrainingDiverged(f"step {step}: {len(bad)} weight tensors are not finite (e.g. {bad[0]}): nothing is "
                               "saved. Resume from the last checkpoint with a smaller --lr or with --grad-clip.")


@contextlib.contextmanager
def input_checks(output_dir: Path):
    """Turns a ValueError raised inside the block into an InputError (errors of the loop itself stay as they are).
    If `output_dir` did not exist or was empty, what the set-up wrote there (the run config, a trained tokenizer) is
    removed with it, so that a corrected command can use the same directory."""
    fresh = not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir()))
    try:
        yield
    except ValueError as error:
        if fresh and output_dir.is_dir() and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(output_dir, ignore_errors=True)
        if isinstance(error, InputError):
            raise
        raise InputError(str(error)) from error


def train(config: TrainConfig) -> dict:
    """Runs (or resumes) training as `config` says; returns the final validation metrics. One run at a time owns its
    output directory: the main process holds its lock (`files.FolderLock`) from the first check to the last write."""
    output_dir = Path(config.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        lock = FolderLock(output_dir, "training run").__enter__() if main_process else None
    except ValueError as error:
        raise InputError(str(error)) from None
    try:
        return run_training(config, output_dir)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def run_training(config: TrainConfig, output_dir: Path) -> dict:
    # ---------------------------------------------------------------- set-up: processes, output directory
    with input_checks(output_dir):  # a ValueError in set-up is bad input: the CLI reports it without a traceback
        run_config = dataclasses.asdict(config)
        if config.model_config is None and config.init_from is None:
            run_config["model_config"] = "tiny"  # the default, spelled as runs before --init-from saved it
        accelerator = make_accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            # We call scheduler.step() once per optimizer step ourselves; by default Accelerate would step it once
            # per process, which makes the schedule depend on the number of processes.
            step_scheduler_with_optimizer=False,
            log_with=[JSONLinesTracker(output_dir / "log.jsonl"), *config.report_to],
            project_dir=str(output_dir),
        )
        micro_batch_size = check_settings(config, accelerator.num_processes)
        check_output_dir(output_dir, run_config, MAY_CHANGE_ON_RESUME, config.resume)
        accelerator.wait_for_everyone()  # every process has read the directory before the main one writes to it
        if accelerator.is_main_process:
            write_run_config(output_dir, run_config)
            remove_temp_checkpoints(output_dir)
        accelerator.wait_for_everyone()

        # ---------------------------------------------------------------- tokenizer, model, data
        tokenizer = load_tokenizer(config, output_dir, accelerator)
        torch.manual_seed(config.seed)  # the initial weights
        if config.init_from is not None:
            model = initial_model(config, tokenizer)
            model_config = model.config
            if config.block_size > model_config.max_position_embeddings:
                raise ValueError(f"--block-size {config.block_size} is above the model's max_position_embeddings "
                                 f"({model_config.max_position_embeddings}).")
        else:
            model_config = build_model_config(config.model_config or "tiny", config.objective == "ar", tokenizer,
                                              config.block_size, config.diffusion_block_size)
            model = build_model(model_config)
            if config.objective != "ar" and config.block_size < model_config.max_position_embeddings:
                # The model never saw sequences longer than a block: generate() fills one by default.
                model.generation_config.max_new_tokens = config.block_size
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if config.lora_r:
            model = apply_lora(model, config)
        objective = get_objective(config.objective, model_config)
        train_blocks, validation_blocks = load_blocks(config, tokenizer, accelerator)
        validation_ids = validation_blocks[: config.eval_blocks]["input_ids"]  # (num_blocks, block_size)
        validation_prompts = (validation_blocks[: config.eval_blocks]["prompt_length"]
                              if "prompt_length" in validation_blocks.column_names else None)
        sampler = BlockSampler(len(train_blocks), config.batch_size, config.seed)
        accelerator.print(
            f"{config.objective}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
            f"{len(train_blocks)} training and {len(validation_ids)} validation blocks of {config.block_size} tokens, "
            f"global batch {config.batch_size} = {accelerator.num_processes} process(es) x {config.grad_accum} "
            f"micro-step(s) x {micro_batch_size}"
        )

    # ---------------------------------------------------------------- optimizer, schedule, EMA
    # Weight decay on matrices only (nanoGPT): never on biases and norm weights.
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters only
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2),
    )
    decay_steps = config.decay_steps or config.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, config.warmup_steps, decay_steps, config.min_lr / config.lr)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA([p for p in model.parameters() if p.requires_grad], config.ema_decay) if config.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # ---------------------------------------------------------------- resume
    step = 0
    checkpoint = latest_checkpoint(output_dir) if config.resume else None
    if checkpoint is not None:
        step = load_checkpoint(accelerator, checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    elif config.resume:
        accelerator.print(f"--resume: no checkpoint in {output_dir}, starting from step 0")
    accelerator.init_trackers("hf_mdm", config={k: str(v) for k, v in run_config.items()})

    def validate() -> dict:
        weights = ema.swapped_in(trainable_of(model)) if ema is not None else contextlib.nullcontext()
        with weights:
            result = validation_loss(model, validation_ids, config.objective, batch_size=micro_batch_size,
                                     num_passes=config.eval_passes, seed=VALIDATION_SEED, accelerator=accelerator,
                                     prompt_lengths=validation_prompts)
        return {"val/nats_per_token": result.nats_per_token, "val/perplexity": result.perplexity}

    # ---------------------------------------------------------------- the loop
    tokens_per_step = config.batch_size * config.block_size
    progress = tqdm(total=config.max_steps, initial=step, disable=not accelerator.is_local_main_process)
    loss_sum, steps_since_log, clock = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    metrics = {}
    while step < config.max_steps:
        # Once in a while: validate (at step 0 too, the untrained baseline).
        if step % config.eval_every == 0:
            started = time.perf_counter()
            metrics = validate()
            accelerator.log(metrics, step=step)
            progress.set_postfix(val=f"{metrics['val/nats_per_token']:.3f}")
            clock += time.perf_counter() - started  # tokens/s counts training time only

        # The global batch of this step and its noise: functions of (seed, step) only, identical on every process.
        indices = sampler.indices(step)
        noise = objective.draw_noise(torch.Generator().manual_seed(config.seed * 1_000_003 + step),
                                     config.batch_size, config.block_size)
        step_loss = torch.zeros((), device=accelerator.device)
        for micro_step in range(config.grad_accum):
            # Global rows of this micro-step on this process: micro-step-major, then process, then row.
            start = (micro_step * accelerator.num_processes + accelerator.process_index) * micro_batch_size
            rows = slice(start, start + micro_batch_size)
            batch = train_blocks[indices[rows].tolist()]
            input_ids = batch["input_ids"].to(accelerator.device, non_blocking=True)
            micro_noise = noise[rows].to(accelerator.device) if noise is not None else None
            extras = {"prompt_lengths": batch["prompt_length"].to(accelerator.device)} if "prompt_length" in batch else {}
            with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
                loss = objective.training_loss(model, input_ids, micro_noise, **extras)
                accelerator.backward(loss)  # divides by grad_accum
            step_loss += loss.detach() / config.grad_accum
        loss_sum += step_loss
        # The global gradient norm (clipping at inf leaves the gradients as they are); NaN if any process had one.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                config.grad_clip if config.grad_clip > 0 else float("inf"))
        check_step_is_finite(step + 1, step_loss, grad_norm, output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(trainable_of(model))
        step += 1
        steps_since_log += 1
        progress.update(1)

        # Once in a while: log the mean training loss of the global batches since the last log.
        if step % config.log_every == 0 or step == config.max_steps:
            train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps_since_log
            elapsed = time.perf_counter() - clock
            accelerator.log({"train/nats_per_token": train_loss, "lr": scheduler.get_last_lr()[0],
                             "tokens_per_s": steps_since_log * tokens_per_step / elapsed}, step=step)
            shown = {"loss": f"{train_loss:.3f}"}
            if metrics:
                shown["val"] = f"{metrics['val/nats_per_token']:.3f}"
            progress.set_postfix(shown)
            loss_sum.zero_()
            steps_since_log, clock = 0, time.perf_counter()

        # Once in a while: a checkpoint that a killed run resumes from.
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            check_weights_are_finite(model, step)
            save_checkpoint(accelerator, output_dir, step, config.save_total_limit)
    progress.close()

    # ---------------------------------------------------------------- the end: validate, checkpoint, save the model
    check_weights_are_finite(model, step)
    metrics = validate()
    accelerator.log(metrics, step=step)
    accelerator.print(f"step {step}: validation {metrics['val/nats_per_token']:.4f} nats/token, "
                      f"perplexity{' bound' if config.objective != 'ar' else ''} {metrics['val/perplexity']:.2f}")
    save_checkpoint(accelerator, output_dir, step, config.save_total_limit)
    save_final_model(accelerator, model, ema, tokenizer, output_dir / "model", model_config)
    if accelerator.is_main_process:
        write_training_card(output_dir / "model", config, step, metrics, accelerator)
    accelerator.end_training()
    return {"step": step, **metrics}


def trainable_of(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def save_final_model(accelerator: Accelerator, model, ema: EMA | None, tokenizer, folder: Path, model_config) -> None:
    """A hub-ready `save_pretrained` folder (config, weights, generation config, remote code) plus the tokenizer.
    With EMA, the EMA weights are the ones saved. With LoRA, `folder` holds the merged model (LoRA folded into the
    weights: a plain checkpoint) and `folder/../adapter` the adapter alone, which peft's `PeftModel.from_pretrained`
    loads on the base model."""
    weights = ema.swapped_in(trainable_of(model)) if ema is not None else contextlib.nullcontext()
    with weights:
        state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards
        unwrapped = accelerator.unwrap_model(model)
        own_class = model_class(unwrapped)
        if is_peft_model(unwrapped):
            if accelerator.is_main_process:
                unwrapped.save_pretrained(folder.parent / "adapter", state_dict=state_dict)
                copy.deepcopy(unwrapped).merge_and_unload().save_pretrained(folder)
        elif own_class is not type(unwrapped):
            # FSDP2 swaps the model's class for a dynamic subclass, whose source save_pretrained would copy as remote
            # code: save an instance of the model's own class, with the gathered weights.
            if accelerator.is_main_process:
                clean = own_class(model_config)
                clean.load_state_dict(state_dict)
                clean.generation_config = unwrapped.generation_config
                clean.save_pretrained(folder)
        else:
            unwrapped.save_pretrained(folder, is_main_process=accelerator.is_main_process,
                                      save_function=accelerator.save, state_dict=state_dict)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()


def model_class(model) -> type:
    """The model's own class: under FSDP2's dynamic subclass, the first class of its MRO defined outside torch."""
    return next(cls for cls in type(model).__mro__ if not cls.__module__.startswith("torch."))


def is_peft_model(model) -> bool:
    return type(model).__module__.startswith("peft.")


def write_training_card(folder: Path, config: TrainConfig, step: int, metrics: dict, accelerator: Accelerator) -> None:
    """The model card (README.md) of the saved model: what was trained on what, for how long, and its validation
    loss, so that the folder is ready for `hf-mdm publish` once its owner has set the license and the description."""
    from ..hub import write_model_card  # imported here: hub pulls in huggingface_hub's card machinery

    kind = "causal LM (autoregressive baseline)" if config.objective == "ar" else "masked diffusion LM"
    data = config.dataset_name or ", ".join(Path(name).name for name in config.train_files)
    if config.validation_files:
        validation = ", ".join(Path(name).name for name in config.validation_files)
    else:
        validation = f"{config.validation_fraction:.0%} of the training documents, held out"
    hub_dataset = config.dataset_name and not Path(config.dataset_name).exists()  # a Hub id, not a local folder
    write_model_card(
        folder,
        title=Path(config.output_dir).name,
        summary=f"A {kind} trained with hf_mdm's `hf-mdm train` (objective `{config.objective}`) on {data}. "
                f"Written by the training run: before publishing, set the license and say what the model is for.",
        license="other",
        datasets=[config.dataset_name] if hub_dataset else [],
        training=dict(
            command=f"hf-mdm train --config {Path(config.output_dir) / 'run_config.json'}",
            steps=step,
            tokens_seen=step * config.batch_size * config.block_size,
            hardware=f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                     f"mixed precision {config.mixed_precision}",
            validation_data=validation,
            validation_nats_per_token=float(metrics["val/nats_per_token"]),
        ),
    )
