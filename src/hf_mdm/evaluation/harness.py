"""hf_mdm models in lm-evaluation-harness (`pip install hf_mdm[lm-eval]`): the model `hf_mdm`.

    hf-mdm lm-eval --model hf_mdm --model_args pretrained=PATH,mc_samples=128,batch_size=32 --tasks hellaswag
    accelerate launch -m hf_mdm.evaluation.harness --model hf_mdm --model_args pretrained=PATH --tasks ...

`hf-mdm lm-eval` (or `python -m hf_mdm.evaluation.harness`) is lm-eval's own command line with the model `hf_mdm`
registered: lm-eval 0.4 discovers no plugins, so its `lm_eval` script only knows the models it ships. In Python,
`import hf_mdm.evaluation.harness` registers it, and `lm_eval.simple_evaluate(model="hf_mdm", ...)` works.

- `loglikelihood`: the Monte-Carlo ELBO of the continuation given the context (`likelihood.mc_loglikelihood`:
  context never masked, masked count stratified over `mc_samples` draws, weight m / l), with `is_greedy` from
  the greedy fill of the continuation (`greedy_check=false` skips that, and reports False).
- `loglikelihood_rolling`: the same over lm-eval's rolling windows of the model's context.
- `generate_until`: `model.generate` on the (left-padded) contexts, `max_gen_toks` new tokens, cut at the first
  end-of-sequence token and at the first of the request's `until` strings. Generation settings: the request's
  `temperature`, `top_p`, `top_k` over the model_args defaults (any `MDMGenerationConfig` field, e.g.
  `unmasking=confidence,block_length=32`) over the checkpoint's generation config; greedy (temperature 0) unless a
  temperature is given, and always with `do_sample=false`, as lm-eval's HF models decode.
- Under `accelerate launch`, lm-eval gives each process its share of the requests; results are gathered.
"""

import sys

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm
from transformers.utils import logging

from ..generation_mdm import MDMGenerationConfig, cut_at_eos
from .likelihood import greedy_matches, mc_loglikelihood


MODEL_ARGS = ("pretrained", "tokenizer", "mc_samples", "batch_size", "max_batch_size", "device", "dtype", "seed",
              "greedy_check", "trust_remote_code", "add_bos_token", "revision")
# What lm-eval puts in a request's generation kwargs, and how each maps onto MDMGenerationConfig.
REQUEST_GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}

logger = logging.get_logger(__name__)


def _generation_fields() -> set:
    fields = set(MDMGenerationConfig().to_dict()) | MDMGenerationConfig.strategy_keys()
    return fields - {"transformers_version", "_from_model_config"}


@register_model("hf_mdm")
class MDMHarnessLM(LM):
    """An hf_mdm checkpoint (any family) as an lm-eval model; model_args are `MODEL_ARGS` plus generation defaults."""

    def __init__(self, pretrained, tokenizer=None, mc_samples: int = 128, batch_size: int | str = 32,
                 max_batch_size: int | None = None, device: str | None = None, dtype: str = "auto", seed: int = 0,
                 greedy_check: bool = True, trust_remote_code: bool = False, add_bos_token: bool = False,
                 revision: str | None = None, **generation):
        super().__init__()
        unknown = sorted(set(generation) - _generation_fields())
        if unknown:
            raise ValueError(f"hf_mdm model_args: unknown argument {unknown[0]!r}; allowed: {', '.join(MODEL_ARGS)} "
                             "and MDMGenerationConfig fields and strategy settings (sampler, steps, order, block_length, ...).")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"hf_mdm model_args: mc_samples must be an integer >= 1, got {mc_samples!r}.")
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise ValueError("hf_mdm model_args: batch_size must be an integer (no 'auto' batch search for MDMs).")
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"hf_mdm model_args: batch_size must be >= 1, got {batch_size}.")
        MDMGenerationConfig(**generation)  # bad generation defaults fail here, naming the field

        from ..distributed import make_accelerator
        from transformers import AutoModel, AutoTokenizer

        import hf_mdm  # noqa: F401  (registers the model types)
        from hf_mdm.pretrained import resolve_checkpoint

        self.accelerator = make_accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if isinstance(pretrained, torch.nn.Module):  # a model object (Python use): then `tokenizer` is required
            if tokenizer is None:
                raise ValueError("hf_mdm model_args: a model object as `pretrained` needs `tokenizer` (object or path).")
            self.model = pretrained.eval()
        else:
            self.model = AutoModel.from_pretrained(resolve_checkpoint(pretrained), dtype=dtype, revision=revision,
                                                   trust_remote_code=trust_remote_code).eval()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for "cuda" unless told otherwise; on a machine without one, the CPU.
            logger.warning("device=%r asked, but CUDA is not available: running on the CPU.", device)
            device = "cpu"
        self._device = torch.device(device) if device and self._world_size == 1 else self.accelerator.device
        self.model.to(self._device)
        if tokenizer is not None and not isinstance(tokenizer, str):
            self.tokenizer = tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(tokenizer or pretrained), revision=revision,
                                                           trust_remote_code=trust_remote_code)
        self.pretrained, self.mc_samples, self.batch_size, self.seed = str(pretrained), mc_samples, batch_size, seed
        self.greedy_check, self.add_bos_token, self.generation = bool(greedy_check), bool(add_bos_token), generation
        config = self.model.config
        self.prefix_token_id = next((t for t in (config.bos_token_id, config.eos_token_id, self.tokenizer.bos_token_id,
                                                 self.tokenizer.eos_token_id) if t is not None), None)

    # ------------------------------------------------------------------------------------------------ lm-eval API

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MDMHarnessLM":
        """model_args win over the command line's own settings (lm-eval always passes its --batch_size, 1 by
        default, and --device), so `--model_args ...,batch_size=32` means 32."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "MDMHarnessLM":
        merged = dict(arg_dict)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in merged:
                merged[key] = value
        return cls(**merged)

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def all_gather(self, tensor):
        return self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ([self.tokenizer.bos_token_id] + ids) if self.add_bos_token and self.tokenizer.bos_token_id is not None else ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's HF models: trailing spaces of the context move to the continuation, and the continuation is
        what the whole string adds to the context's tokens (so tokens that merge across the boundary stay whole)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        return self._loglikelihood_tokens(pairs, disable_tqdm)

    def _loglikelihood_tokens(self, pairs, disable_tqdm=False) -> list[tuple[float, bool]]:
        estimates = mc_loglikelihood(self.model, pairs, self.mc_samples, self.batch_size, self.seed,
                                     progress=not disable_tqdm and self.rank == 0, prefix_token_id=self.prefix_token_id)
        greedy = (greedy_matches(self.model, pairs, self.batch_size, self.prefix_token_id) if self.greedy_check
                  else [False] * len(pairs))
        return [(estimate.loglikelihood, bool(is_greedy)) for estimate, is_greedy in zip(estimates, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        window = self.model.config.max_position_embeddings
        if getattr(self.model.config, "shift_logits", False):
            window -= 1  # a shifted model spends one position on the token before the first it predicts
        totals = []
        for request in tqdm(requests, desc="rolling", disable=disable_tqdm or self.rank != 0, leave=False):
            tokens = self.encode(request.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, prefix_token=self.prefix_token_id, max_seq_len=window, context_len=1)]
            estimates = mc_loglikelihood(self.model, windows, self.mc_samples, self.batch_size, self.seed,
                                         prefix_token_id=self.prefix_token_id)
            totals.append(sum(e.loglikelihood for e in estimates))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            kwargs = dict(request.args[1]) if len(request.args) > 1 else {}
            unknown = sorted(set(kwargs) - REQUEST_GENERATION_KEYS)
            if unknown:
                raise ValueError(f"hf_mdm generate_until: unsupported generation argument {unknown[0]!r} from the task; "
                                 f"supported: {sorted(REQUEST_GENERATION_KEYS)}.")
            groups.setdefault(repr(sorted(kwargs.items())), []).append(index)
        for indices in tqdm(groups.values(), desc="generate_until", disable=disable_tqdm or self.rank != 0, leave=False):
            kwargs = dict(requests[indices[0]].args[1]) if len(requests[indices[0]].args) > 1 else {}
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            settings = dict(self.generation)
            settings["max_new_tokens"] = int(kwargs.pop("max_gen_toks", settings.get("max_new_tokens") or 256))
            do_sample = kwargs.pop("do_sample", None)
            for key in ("temperature", "top_p", "top_k"):
                if key in kwargs:
                    settings[key] = kwargs.pop(key)
            # As lm-eval's HF models: greedy unless the task asks for sampling (do_sample, or a temperature > 0).
            settings.setdefault("temperature", 0.0)
            if do_sample is False:
                settings["temperature"] = 0.0
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, text in zip(chunk, self._generate([requests[i].args[0] for i in chunk], settings)):
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[index] = text
        return outputs

    def _generate(self, contexts: list[str], settings: dict) -> list[str]:
        encoded = [self.encode(context) for context in contexts]
        window = self.model.config.max_position_embeddings - settings["max_new_tokens"]
        if window < 1:
            raise ValueError(f"max_gen_toks={settings['max_new_tokens']} leaves no room for the context in the model's "
                             f"window ({self.model.config.max_position_embeddings}).")
        encoded = [ids[-window:] or ([self.prefix_token_id] if self.prefix_token_id is not None else []) for ids in encoded]
        width = max(len(ids) for ids in encoded)
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, tokens in enumerate(encoded):
            if tokens:
                ids[row, width - len(tokens):], attention[row, width - len(tokens):] = torch.tensor(tokens), 1
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        out = self.model.generate(ids.to(self.device), attention_mask=attention.to(self.device), generator=generator,
                                  **settings)
        answers = cut_at_eos(out.cpu(), self.model.generation_config.eos_token_id, start=width)
        return self.tokenizer.batch_decode(answers, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the model `hf_mdm` registered (this module's import did it)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    parser = HarnessCLI()
    args = parser.parse_args()
    if getattr(args, "device", "given") is None and not getattr(args, "config", None) and \
            not torch.cuda.is_available():
        # lm-eval's own default device is cuda:0, which it then reports as "asked, but not available": on a machine
        # without CUDA, a run that names no device runs on the CPU (an explicit --device cuda still warns).
        args.device = "cpu"
    parser.execute(args)


if __name__ == "__main__":
    main()


__all__ = ["MDMHarnessLM", "main"]
