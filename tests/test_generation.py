import textwrap

import pytest
import torch
from scipy import stats
from transformers import AutoModel, GenerationConfig, TextDiffusionStreamer
from transformers.generation.streamers import BaseStreamer

from hf_mdm import MDMGenerationConfig

from conftest import run_without_hf_mdm, tiny_model
from oracle import LENGTH, MASK, SEQUENCES, OracleDenoiser, oracle_config, sequence_index


SAMPLES = 20_000


def oracle_chisquare(samples: torch.Tensor, joint: torch.Tensor) -> float:
    counts = torch.bincount(sequence_index(samples), minlength=len(SEQUENCES)).double()
    return stats.chisquare(counts.numpy(), (joint * len(samples)).numpy()).pvalue


def total_variation(samples, joint):
    counts = torch.bincount(sequence_index(samples), minlength=len(SEQUENCES)).double()
    return 0.5 * (counts / counts.sum() - joint).abs().sum().item()


@pytest.fixture(scope="module")
def oracle():
    return OracleDenoiser(oracle_config()).eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        dict(sampler="first_hitting"),
        # Blocks decoded left to right, FHS within each: the chain rule q(x_1 x_2) q(x_3 x_4 | x_1 x_2) for an exact
        # denoiser, so exactly the joint again (for a learned one, the network's own block conditionals).
        dict(sampler="first_hitting", block_length=2),
        dict(sampler="ancestral", steps=1000),
        dict(sampler="ancestral_cache", steps=1000),
    ],
    ids=lambda s: s["sampler"] + ("_blocks" if s.get("block_length") else ""),
)
def test_exact_samplers_match_the_joint(oracle, settings):
    generator = torch.Generator().manual_seed(0)
    out = oracle.generate(max_new_tokens=LENGTH, num_return_sequences=SAMPLES, generator=generator,
                          sampling_dtype="float64", return_dict_in_generate=True, **settings)
    assert (out.sequences != MASK).all()
    assert oracle_chisquare(out.sequences, oracle.joint) > 1e-3
    if settings["sampler"] == "first_hitting":
        assert out.nfe == LENGTH
        assert (out.nfe_per_sequence == LENGTH).all()
    if settings["sampler"] == "ancestral_cache":
        # The cache skips the network for rows that did not change: far fewer evaluations than steps.
        assert out.nfe_per_sequence.float().mean() <= LENGTH + 1


@pytest.mark.parametrize("tokens_per_step", [2, 4])
def test_parallel_first_hitting_deviates_and_we_show_it(oracle, tokens_per_step):
    """k > 1 samples k positions independently from one output: an approximation, visibly wrong on a joint with
    strong dependence. Measured total variation from the joint (seed 0, 20k samples): 0.025 for exact FHS (k = 1,
    sampling noise), 0.148 for k = 2, 0.431 for k = 4; chi-square p-values 0.16, < 1e-300, < 1e-300."""
    generator = torch.Generator().manual_seed(0)
    out = oracle.generate(max_new_tokens=LENGTH, num_return_sequences=SAMPLES, generator=generator,
                          tokens_per_step=tokens_per_step, return_dict_in_generate=True)
    assert out.nfe == LENGTH // tokens_per_step
    assert oracle_chisquare(out.sequences, oracle.joint) < 1e-6
    exact = oracle.generate(max_new_tokens=LENGTH, num_return_sequences=SAMPLES, generator=torch.Generator().manual_seed(1))
    assert total_variation(out.sequences, oracle.joint) > 2 * total_variation(exact, oracle.joint)


def test_infilling_samples_the_conditional(oracle):
    """x = [1, MASK, MASK, 0]: the samples must follow p(x1, x2 | x0 = 1, x3 = 0)."""
    prompt = torch.tensor([[1, MASK, MASK, 0]])
    out = oracle.generate(prompt, num_return_sequences=SAMPLES, generator=torch.Generator().manual_seed(3))
    assert out.shape == (SAMPLES, LENGTH)
    assert (out[:, 0] == 1).all() and (out[:, 3] == 0).all()
    keep = (SEQUENCES[:, 0] == 1) & (SEQUENCES[:, 3] == 0)
    conditional = oracle.joint * keep
    conditional = conditional / conditional.sum()
    counts = torch.bincount(sequence_index(out), minlength=len(SEQUENCES))[keep].double()
    assert stats.chisquare(counts.numpy(), (conditional[keep] * SAMPLES).numpy()).pvalue > 1e-3


def test_prompts_kept_nothing_masked_and_batched_prompt_lengths():
    model = tiny_model()
    ids = torch.tensor([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_return_sequences=2,
                         generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    seqs = out.sequences
    assert seqs.shape == (4, 11)
    assert (seqs[:2, 2:5] == torch.tensor([7, 8, 9])).all() and (seqs[2:, :5] == ids[1]).all()
    assert (seqs != model.config.mask_token_id).all()
    assert out.nfe == 6 and (out.nfe_per_sequence == 6).all()

    # Right padding is moved to the left: the same prompt gives the same samples.
    right = model.generate(torch.tensor([[7, 8, 9, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0]]),
                           max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    left = model.generate(torch.tensor([[0, 0, 7, 8, 9]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1]]),
                          max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(right, left)


def test_padded_prompt_generates_as_if_alone():
    """A left-padded prompt in a batch gets the same tokens as the same prompt alone (same generator state)."""
    model = tiny_model()
    alone = model.generate(torch.tensor([[7, 8, 9]]), max_new_tokens=5, generator=torch.Generator().manual_seed(2),
                           temperature=0)
    batched = model.generate(torch.tensor([[0, 0, 7, 8, 9]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1]]),
                             max_new_tokens=5, generator=torch.Generator().manual_seed(2), temperature=0)
    assert torch.equal(batched[0, 2:], alone[0])


def test_infilling_keeps_non_mask_tokens_and_max_new_tokens_zero():
    model = tiny_model()
    mask_id = model.config.mask_token_id
    ids = torch.tensor([[5, mask_id, 6, mask_id, mask_id, 7]])
    for sampler in ("first_hitting", "ancestral", "ancestral_cache"):
        out = model.generate(ids, max_new_tokens=0, sampler=sampler, generator=torch.Generator().manual_seed(0),
                             return_dict_in_generate=True)
        assert out.sequences.shape == ids.shape
        assert (out.sequences[0, [0, 2, 5]] == torch.tensor([5, 6, 7])).all()
        assert (out.sequences != mask_id).all()
    assert model.generate(ids, return_dict_in_generate=True).nfe == 3  # exact FHS: one call per [MASK]


def test_same_seed_same_output_and_history():
    model = tiny_model()
    a = model.generate(max_new_tokens=12, num_return_sequences=3, generator=torch.Generator().manual_seed(7))
    b = model.generate(max_new_tokens=12, num_return_sequences=3, generator=torch.Generator().manual_seed(7))
    c = model.generate(max_new_tokens=12, num_return_sequences=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    out = model.generate(max_new_tokens=12, generator=torch.Generator().manual_seed(7), output_history=True,
                         return_dict_in_generate=True)
    assert len(out.history) == 12
    masks_left = [int((h == model.config.mask_token_id).sum()) for h in out.history]
    assert masks_left == list(range(11, -1, -1))
    assert torch.equal(out.history[-1], out.sequences)


def test_generation_config_round_trip_and_kwargs_override(tmp_path):
    model = tiny_model()
    model.generation_config = MDMGenerationConfig(sampler="ancestral", steps=7, sampling_dtype="float32", top_k=5)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded.generation_config) is MDMGenerationConfig
    assert (loaded.generation_config.sampler, loaded.generation_config.steps) == ("ancestral", 7)
    assert loaded.generation_config.sampling_dtype == "float32" and loaded.generation_config.top_k == 5
    out = loaded.generate(max_new_tokens=8, return_dict_in_generate=True, generator=torch.Generator().manual_seed(0))
    assert out.nfe <= 7
    out = loaded.generate(max_new_tokens=8, sampler="first_hitting", steps=None, return_dict_in_generate=True)
    assert out.nfe == 8
    assert loaded.generation_config.sampler == "ancestral"  # kwargs do not change the stored config


REMOTE_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model.generation_config).__name__ == "MDMGenerationConfig", type(model.generation_config)
    out = model.generate(max_new_tokens=10, num_return_sequences=3, generator=torch.Generator().manual_seed(4))
    torch.save(out, sys.argv[2])
    """
)


def test_remote_code_generates_the_same(tmp_path):
    model = tiny_model()
    model.generation_config = MDMGenerationConfig(sampler="ancestral_cache", steps=20)
    model.save_pretrained(tmp_path / "ckpt")
    run_without_hf_mdm(REMOTE_SCRIPT, [tmp_path / "ckpt", tmp_path / "out.pt"], tmp_path)
    expected = model.generate(max_new_tokens=10, num_return_sequences=3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


class RecordingDiffusionStreamer(RecordingStreamer):
    def __init__(self):
        super().__init__()
        self.drafts = []

    def put_draft(self, value):
        self.drafts.append(value.clone())


def test_a_diffusion_streamer_receives_each_draft_and_a_plain_one_the_final_text_once():
    model = tiny_model()
    prompt = torch.tensor([[4, 5]])
    diffusion, plain = RecordingDiffusionStreamer(), RecordingStreamer()
    out = model.generate(prompt, max_new_tokens=6, streamer=diffusion, generator=torch.Generator().manual_seed(0))
    assert len(diffusion.drafts) == 6 and diffusion.ended
    assert [int((d == model.config.mask_token_id).sum()) for d in diffusion.drafts] == [5, 4, 3, 2, 1, 0]
    assert torch.equal(diffusion.drafts[-1], out[:, 2:])
    assert len(diffusion.puts) == 2 and torch.equal(diffusion.puts[0], prompt) and torch.equal(diffusion.puts[1], out[:, 2:])
    again = model.generate(prompt, max_new_tokens=6, streamer=plain, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out) and plain.ended
    assert len(plain.puts) == 2 and torch.equal(plain.puts[0], prompt) and torch.equal(plain.puts[1], out[:, 2:])


def test_text_streamer_prints_the_prompt_and_the_answer_once(capsys):
    from transformers import TextStreamer

    model = tiny_model()
    out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=4, streamer=TextStreamer(CharTokenizer()),
                         generator=torch.Generator().manual_seed(0))
    assert capsys.readouterr().out == CharTokenizer().decode(out[0]) + "\n"


class CharTokenizer:
    """Just enough tokenizer for TextDiffusionStreamer: ids 1..26 are letters, the rest '_'."""

    def decode(self, ids, **kwargs):
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return "".join(chr(96 + i) if 1 <= i <= 26 else "_" for i in ids)


def test_text_diffusion_streamer(capsys):
    model = tiny_model()
    model.generate(torch.tensor([[1, 2]]), max_new_tokens=4, streamer=TextDiffusionStreamer(CharTokenizer()),
                   generator=torch.Generator().manual_seed(0))
    printed = capsys.readouterr().out
    assert printed.count("\0337") == 4  # one draft per step


def test_plain_generation_config_and_pipeline_kwargs_are_mapped():
    model = tiny_model()
    greedy = model.generate(torch.tensor([[3, 4]]), generation_config=GenerationConfig(do_sample=False, max_new_tokens=5))
    again = model.generate(torch.tensor([[3, 4]]), max_new_tokens=5, temperature=0.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(greedy, again)
    out = model.generate(torch.tensor([[3, 4]]), do_sample=True, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=5,
                         pad_token_id=0, use_cache=True)
    assert out.shape == (1, 7)


def test_text_generation_pipeline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {chr(97 + i): i + 1 for i in range(26)}
    vocab.update({"[PAD]": 0, " ": 27})
    vocab.update({f"x{i}": i for i in range(28, 50)})
    vocab["[MASK]"] = 50
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", mask_token="[MASK]")
    model = tiny_model()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generator("abc", max_new_tokens=6, do_sample=True, temperature=0.8)
    text = result[0]["generated_text"]
    assert text.startswith("abc") and len(text) > 3
    with pytest.raises(ValueError, match="num_beams"):
        generator("abc", max_new_tokens=6, num_beams=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="dpm"), "sampler must be one of"),
        (dict(tokens_per_step=0), "tokens_per_step"),
        (dict(steps=0), "steps"),
        (dict(sampling_dtype="int8"), "sampling_dtype must be a floating type"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=-2), "max_new_tokens"),
        (dict(num_beams=3), "num_beams"),
        (dict(repetition_penalty=1.3), "repetition_penalty"),
        (dict(tokens_per_step=2, steps=3), "either tokens_per_step or steps"),
        (dict(input_ids=torch.tensor([[1, 2, 99]])), "vocab_size"),
        (dict(input_ids=torch.ones(1, 10, dtype=torch.long), max_length=5), "longer than max_length"),
        (dict(max_new_tokens=100), "max_position_embeddings"),
        (dict(unknown_flag=True), "does not know"),
    ],
)
def test_bad_generate_input(kwargs, message):
    model = tiny_model()
    kwargs.setdefault("max_new_tokens", 4) if "max_length" not in kwargs else None
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


def test_ancestral_cache_refuses_time_conditioned_models():
    model = tiny_model(time_conditioning=True)
    with pytest.raises(ValueError, match="time-agnostic"):
        model.generate(max_new_tokens=4, sampler="ancestral_cache")
    out = model.generate(max_new_tokens=4, sampler="ancestral", steps=8, return_dict_in_generate=True)
    assert (out.sequences != model.config.mask_token_id).all()


def _row_statistic(sequences: torch.Tensor) -> torch.Tensor:
    """A per-sample number with spread under the oracle's joint: count of token 0, plus 2 if the ends agree."""
    return ((sequences == 0).sum(1) + 2 * (sequences[:, 0] == sequences[:, -1])).double()


@pytest.mark.parametrize(
    "settings, batches",
    [(dict(sampler="first_hitting", sampling_dtype="float64"), 300),
     (dict(sampler="first_hitting", sampling_dtype="float32"), 300),
     (dict(sampler="ancestral_cache", steps=16, sampling_dtype="float64"), 150)],
    ids=["fhs-float64", "fhs-float32", "ancestral_cache-float64"],
)
def test_rows_of_a_batch_and_batches_of_consecutive_seeds_are_independent(oracle, settings, batches):
    """Batches of 32 with seeds 0, 1, 2, ... (as `hf-mdm evaluate` and examples/reproduce_paper.py draw them): the
    batch means of a per-sample statistic vary only as much as the rows within a batch allow (one-way ANOVA across
    batches p > 0.001), neighbouring rows of a batch are uncorrelated, and so are rows at the same index in batches
    of consecutive seeds (Pearson p > 0.001). The same data with a tenth of each batch's rows copied from its first
    row (intraclass correlation ~0.02) fails the ANOVA at p < 1e-6: the test sees a correlation that small."""
    statistic = torch.stack([
        _row_statistic(oracle.generate(max_new_tokens=LENGTH, num_return_sequences=32, generator=torch.Generator().manual_seed(seed),
                                       **settings))
        for seed in range(batches)
    ]).numpy()  # (batches, 32)
    assert stats.f_oneway(*statistic).pvalue > 1e-3
    assert stats.pearsonr(statistic[:, ::2].ravel(), statistic[:, 1::2].ravel()).pvalue > 1e-3
    assert stats.pearsonr(statistic[:-1].ravel(), statistic[1:].ravel()).pvalue > 1e-3
    copied = statistic.copy()
    copied[:, 1::10] = copied[:, :1]
    assert stats.f_oneway(*copied).pvalue < 1e-6


def test_a_sample_depends_on_its_seed_alone():
    """Nothing carries from one generate() call to the next: after other samplers, dtypes and seeds have run in the
    same process, and after the global RNGs moved (the AR baseline seeds torch's), the same seed gives the same
    samples, as it did in a fresh process when results/paper was made (the order of settings in a part does not
    matter)."""
    import numpy as np

    model = tiny_model()
    kwargs = dict(max_new_tokens=12, num_return_sequences=4)
    first = model.generate(generator=torch.Generator().manual_seed(3), sampling_dtype="float64", **kwargs)
    model.generate(generator=torch.Generator().manual_seed(3), sampling_dtype="float32", **kwargs)
    model.generate(generator=torch.Generator().manual_seed(4), sampler="ancestral_cache", steps=48, **kwargs)
    torch.manual_seed(123)
    np.random.seed(123)
    torch.rand(1000)
    again = model.generate(generator=torch.Generator().manual_seed(3), sampling_dtype="float64", **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, model.generate(generator=torch.Generator().manual_seed(4), **kwargs))


def test_text_generation_pipeline_loads_a_folder_quietly(caplog):
    from transformers import pipeline
    from transformers.utils import logging

    from hf_mdm import pretrained_path
    from hf_mdm.evaluation.judge import load_judge

    logging.enable_propagation()
    try:
        generator = pipeline("text-generation", model=str(pretrained_path("shakespeare-mdm")))
        text = generator("ROMEO.", max_new_tokens=8, generator=torch.Generator().manual_seed(0))[0]["generated_text"]
    finally:
        logging.disable_propagation()
    assert type(generator.model).__name__ == "MDMForMaskedDiffusion" and text.startswith("ROMEO.") and len(text) > 6
    assert "not supported" not in caplog.text
    with pytest.raises(ValueError, match="is a masked diffusion model; a judge scores next-token likelihoods"):
        load_judge(str(pretrained_path("shakespeare-mdm")))  # AutoModelForCausalLM now loads MDMs: judges refuse them
