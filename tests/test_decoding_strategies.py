"""The decoding strategies of instruct MDMs behind the one sampler contract: confidence orders and the threshold rule
on hand-made logits, semi-autoregressive blocks, ReMDM remasking, the block KV cache, and batch independence."""

import math

import pytest
import torch

from hf_mdm import MDMGenerationConfig
from hf_mdm.cache_mdm import MDMCanvasCache
from hf_mdm.sampling_mdm import CategoricalSampler, ConfidenceSampler, DiffusionState, confidence_scores

from conftest import tiny_llama_model, tiny_model


# ---------------------------------------------------------------------------------------------------------------
# Hand-made logits: which positions each order picks.
# ---------------------------------------------------------------------------------------------------------------

VOCAB, MASK = 42, 41  # 41 real tokens and [MASK]


def distribution(*probs):
    row = torch.zeros(VOCAB, dtype=torch.float64)
    row[: len(probs)] = torch.tensor(probs, dtype=torch.float64)
    return row


# Position 0: flat (least sure by every score). 1: the lowest entropy, 0.58 / 0.42. 2: the largest margin,
# 0.61 then 39 x 0.01. 3: the most probable top token, 0.62 then 8 x 0.0475.
TABLE = torch.stack([
    distribution(*[1 / 41] * 41),
    distribution(0.58, 0.42),
    distribution(0.61, *[0.01] * 39),
    distribution(0.62, *[0.0475] * 8),
])


def table_denoiser(calls=None):
    def denoise(rows, tokens, positions, times, window=None):
        if calls is not None:
            calls.append((positions.clone(), window))
        logits = TABLE.log()[positions]  # (R, k, V); positions index the table's rows
        logits[..., MASK] = -1e4
        return logits
    return denoise


def one_step(order, generator_seed=0, **settings):
    state = DiffusionState.start(torch.full((1, 4), MASK), torch.ones(1, 4, dtype=torch.bool))
    categorical = CategoricalSampler(temperature=0, mask_token_id=MASK,
                                     generator=torch.Generator().manual_seed(generator_seed))
    sampler = ConfidenceSampler(categorical=categorical, order=order, **settings)
    after = sampler.step(state, table_denoiser())
    return sorted((~after.masked[0]).nonzero()[:, 0].tolist()), after


def test_the_scores_of_each_order():
    probs, drawn = TABLE[None], torch.zeros(1, 4, dtype=torch.long)
    torch.testing.assert_close(confidence_scores("confidence", probs, drawn)[0],
                               torch.tensor([1 / 41, 0.58, 0.61, 0.62], dtype=torch.float64))
    torch.testing.assert_close(confidence_scores("margin", probs, drawn)[0],
                               torch.tensor([0.0, 0.16, 0.60, 0.5725], dtype=torch.float64))
    entropy = [math.log(1 / 41), 0.58 * math.log(0.58) + 0.42 * math.log(0.42),
               0.61 * math.log(0.61) + 39 * 0.01 * math.log(0.01), 0.62 * math.log(0.62) + 8 * 0.0475 * math.log(0.0475)]
    torch.testing.assert_close(confidence_scores("entropy", probs, drawn)[0], torch.tensor(entropy, dtype=torch.float64))


@pytest.mark.parametrize("order, one, two", [("confidence", [3], [2, 3]), ("margin", [2], [2, 3]),
                                             ("entropy", [1], [1, 3])])
def test_each_order_picks_its_positions(order, one, two):
    picked, after = one_step(order, tokens_per_step=1)
    assert picked == one
    assert after.tokens[0, one[0]] == 0  # greedy: the top token
    picked, _ = one_step(order, tokens_per_step=2)
    assert picked == two


def test_the_threshold_unmasks_exactly_the_positions_above_it_and_one_when_none_is():
    assert one_step("confidence", confidence_threshold=0.6)[0] == [2, 3]  # 0.61 and 0.62
    assert one_step("confidence", confidence_threshold=0.59)[0] == [2, 3]
    assert one_step("confidence", confidence_threshold=0.5)[0] == [1, 2, 3]
    assert one_step("confidence", confidence_threshold=0.9)[0] == [3]  # none above: the most confident alone
    assert one_step("margin", confidence_threshold=0.59)[0] == [2]


def test_confidences_come_from_the_draws_in_the_sampling_dtype():
    """Not greedy: the score is the probability of the token actually drawn, in float64."""
    state = DiffusionState.start(torch.full((2000, 4), MASK), torch.ones(2000, 4, dtype=torch.bool))
    categorical = CategoricalSampler(mask_token_id=MASK, generator=torch.Generator().manual_seed(0))
    after = ConfidenceSampler(categorical=categorical, order="confidence", tokens_per_step=4).step(state, table_denoiser())
    drawn = after.tokens[:, 1]  # position 1 draws token 0 w.p. 0.58, token 1 w.p. 0.42
    expected = torch.where(drawn == 0, 0.58, 0.42).double()
    torch.testing.assert_close(after.confidence[:, 1], expected)
    assert after.confidence.dtype == torch.float64
    assert 0.53 < (drawn == 0).double().mean() < 0.63


# ---------------------------------------------------------------------------------------------------------------
# Blocks, remasking and counts on a real (tiny) network.
# ---------------------------------------------------------------------------------------------------------------

PROMPT = torch.tensor([[3, 5, 6, 7], [3, 8, 9, 9]])


def run(model, history=True, **settings):
    return model.generate(PROMPT, max_new_tokens=12, generator=torch.Generator().manual_seed(0),
                          return_dict_in_generate=True, output_history=history, **settings)


def newly_unmasked(out, mask_id):
    previous = torch.cat([PROMPT, torch.full((2, 12), mask_id)], dim=1)
    for tokens in out.history:
        yield (previous == mask_id) & (tokens != mask_id), (previous != mask_id) & (tokens == mask_id)
        previous = tokens


@pytest.mark.parametrize("settings", [
    dict(block_length=4), dict(block_length=4, tokens_per_step=2), dict(block_length=4, steps=6),
    dict(block_length=4, unmasking="confidence", steps=6), dict(block_length=5, unmasking="entropy", confidence_threshold=0.1),
    dict(block_length=4, sampler="ancestral", steps=9), dict(block_length=4, sampler="ancestral", steps=18, remasking="remdm",
                                                             remasking_eta=0.3),
], ids=["fhs", "parallel", "fhs_budget", "confidence", "threshold", "ancestral", "remdm"])
def test_blocks_never_unmask_outside_the_active_block(settings):
    model = tiny_model()
    mask_id = model.config.mask_token_id
    out = run(model, **settings)
    block_length = settings["block_length"]
    finished = -1
    for unmasked, remasked in newly_unmasked(out, mask_id):
        blocks = {(int(p) - 4) // block_length for p in unmasked.nonzero()[:, 1]}
        blocks |= {(int(p) - 4) // block_length for p in remasked.nonzero()[:, 1]}
        assert len(blocks) <= 1, blocks  # rows of this batch advance together here
        if blocks:
            block = blocks.pop()
            assert block >= finished  # left to right
            finished = block
    assert not (out.sequences == mask_id).any()
    if "steps" in settings and settings.get("sampler", "first_hitting") == "first_hitting":
        assert out.nfe <= settings["steps"]


def test_block_budget_splits_steps_across_blocks():
    """12 positions, blocks of 4, 6 calls: 2 calls per block, 2 tokens per call (LLaDA's schedule)."""
    model = tiny_model()
    out = run(model, block_length=4, unmasking="confidence", steps=6)
    counts = [int(u.sum(dim=1)[0]) for u, _ in newly_unmasked(out, model.config.mask_token_id)]
    assert out.nfe == 6 and counts == [2] * 6


def test_rows_keep_their_own_counts():
    """Different numbers of masked positions per row (infilling): each row spreads its own over the budget."""
    model = tiny_model()
    mask_id = model.config.mask_token_id
    ids = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, :8] = mask_id
    ids[1, :3] = mask_id
    out = model.generate(ids, max_new_tokens=0, unmasking="margin", steps=4, temperature=0, return_dict_in_generate=True,
                         output_history=True)
    previous = ids
    counts = []
    for tokens in out.history:
        counts.append(((previous == mask_id) & (tokens != mask_id)).sum(dim=1).tolist())
        previous = tokens
    assert counts == [[2, 1], [2, 1], [2, 1], [2, 0]] and out.nfe == 4


@pytest.mark.parametrize("schedule", ["cap", "rescale", "conf"])
def test_remasking_terminates_keeps_the_prompt_and_remasks(schedule):
    model = tiny_model()
    mask_id = model.config.mask_token_id
    eta = None if schedule == "conf" else 0.5
    out = run(model, sampler="ancestral", steps=60, remasking="remdm", remasking_schedule=schedule, remasking_eta=eta)
    assert out.nfe == 60  # the whole time grid, even once nothing is masked
    assert not (out.sequences == mask_id).any()
    for tokens in out.history:
        assert torch.equal(tokens[:, :4], PROMPT)  # the prompt is never remasked
    remasks = sum(int(r.sum()) for _, r in newly_unmasked(out, mask_id))
    assert remasks > 0
    assert not any(r.any() for _, r in list(newly_unmasked(out, mask_id))[-1:])  # the last step remasks nothing


def test_without_remasking_eta_zero_is_mdlm_ancestral():
    model = tiny_model()
    plain = run(model, history=False, sampler="ancestral", steps=20)
    zero = run(model, history=False, sampler="ancestral", steps=20, remasking="remdm", remasking_eta=0.0)
    assert torch.equal(plain.sequences, zero.sequences)


# ---------------------------------------------------------------------------------------------------------------
# The block KV cache.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dit", "llada", "dream"])
@pytest.mark.parametrize("start, end", [(6, 10), (0, 5), (10, 14)])
def test_a_cache_read_on_unchanged_tokens_equals_the_full_forward(family, start, end):
    model = tiny_model() if family == "dit" else tiny_llama_model(dream=family == "dream")
    ids = torch.randint(1, 40, (3, 14), generator=torch.Generator().manual_seed(1))
    ids[:, 3::2] = model.config.mask_token_id
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask).logits
    cache = MDMCanvasCache(model.config.num_hidden_layers, 3, ids.shape[1])
    model(ids, attention_mask=mask, cache=cache.segment(None, 0))  # writes every position of every row
    segment = model(ids[:, start:end], attention_mask=mask, cache=cache.segment(None, start)).logits
    torch.testing.assert_close(segment, full[:, start:end], rtol=1e-5, atol=1e-5)
    positions = torch.tensor([[0, end - start - 1], [1, 1]])  # a subset of the rows
    subset = model(ids[[0, 2], start:end], attention_mask=mask[[0, 2]], cache=cache.segment(torch.tensor([0, 2]), start),
                   output_positions=positions).logits
    expected = torch.stack([full[[0, 2][i], start + positions[i]] for i in range(2)])
    torch.testing.assert_close(subset, expected, rtol=1e-5, atol=1e-5)


CACHED = [dict(unmasking="confidence", steps=6), dict(unmasking="entropy", confidence_threshold=0.2),
          dict(tokens_per_step=2), dict(sampler="ancestral", steps=9)]


@pytest.mark.parametrize("family", ["dit", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("settings", CACHED, ids=["confidence", "threshold", "parallel_fhs", "ancestral"])
def test_a_block_cache_runs_short_inputs_and_refreshed_every_call_is_the_uncached_run(family, mode, settings):
    """The exactness of a cache read itself is checked at the model level above; here generate()'s plumbing: with
    a refresh at every call nothing is read from the cache (the uncached run exactly), and with one refresh per
    block the later calls of a block run the window only (4 positions dual, the rest of the canvas prefix)."""
    model = tiny_model() if family == "dit" else tiny_llama_model(dream=True)
    padded = torch.cat([torch.tensor([[0, 0]]), PROMPT[1:, :2]], dim=1)
    prompts, attention = torch.cat([PROMPT[:1], padded]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])

    def sample(**extra):
        lengths = []
        hook = model.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
        try:
            out = model.generate(prompts, attention_mask=attention, max_new_tokens=12, block_length=4,
                                 generator=torch.Generator().manual_seed(3), **settings, **extra)
        finally:
            hook.remove()
        return out, lengths

    plain, plain_lengths = sample()
    exact, _ = sample(use_cache=True, cache_mode=mode, cache_refresh_steps=1)
    assert torch.equal(exact, plain)
    cached, lengths = sample(use_cache=True, cache_mode=mode)
    assert not (cached == model.config.mask_token_id).any() and torch.equal(cached[:, :4][attention.bool()],
                                                                            prompts[attention.bool()])
    assert set(plain_lengths) == {16}
    short = [n for n in lengths if n < 16]
    assert short and (max(short) <= 4 if mode == "dual" else max(short) <= 12)


# ---------------------------------------------------------------------------------------------------------------
# Batch independence and settings.
# ---------------------------------------------------------------------------------------------------------------

GREEDY = [
    dict(unmasking="confidence", steps=6), dict(unmasking="margin", steps=12), dict(unmasking="entropy", tokens_per_step=3),
    dict(unmasking="confidence", confidence_threshold=0.3), dict(unmasking="confidence", steps=6, block_length=4),
    dict(unmasking="entropy", confidence_threshold=0.2, block_length=4),
    dict(unmasking="confidence", steps=6, block_length=4, use_cache=True),
    dict(unmasking="margin", steps=6, block_length=4, use_cache=True, cache_mode="dual"),
    # The threshold rule moves rows to their next block at different steps: windows and refreshes are per row.
    dict(unmasking="confidence", confidence_threshold=0.2, block_length=4, use_cache=True),
    dict(unmasking="entropy", confidence_threshold=0.3, block_length=4, use_cache=True, cache_mode="dual"),
]


@pytest.mark.parametrize("family", ["dit", "dream"])
@pytest.mark.parametrize("settings", GREEDY, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_greedy_decoding_of_a_padded_batch_equals_each_prompt_alone(family, settings):
    model = tiny_model() if family == "dit" else tiny_llama_model(dream=True)
    prompts = [[3, 5, 6, 7, 8, 9], [3, 8], [3, 9, 10, 11]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    together = model.generate(ids, attention_mask=attention, max_new_tokens=12, temperature=0, **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12, temperature=0, **settings)
        assert torch.equal(together[row, -12:], alone[0, -12:]), prompt


def test_strategy_settings_save_restore_and_refuse_bad_values(tmp_path):
    config = MDMGenerationConfig(unmasking="entropy", confidence_threshold=0.9, block_length=32, use_cache=True,
                                 cache_mode="dual", cache_refresh_steps=4)
    config.save_pretrained(tmp_path)
    loaded = MDMGenerationConfig.from_pretrained(tmp_path)
    for field in ("unmasking", "confidence_threshold", "block_length", "use_cache", "cache_mode", "cache_refresh_steps"):
        assert getattr(loaded, field) == getattr(config, field)
    remdm = MDMGenerationConfig(sampler="ancestral", remasking="remdm", remasking_schedule="rescale", remasking_eta=0.02)
    remdm.save_pretrained(tmp_path / "remdm")
    assert MDMGenerationConfig.from_pretrained(tmp_path / "remdm").remasking_eta == 0.02
    bad = [
        (dict(unmasking="lowest"), "unmasking must be one of"),
        (dict(unmasking="confidence", sampler="ancestral"), "sampler='first_hitting'"),
        (dict(unmasking="confidence", confidence_threshold=1.5), "confidence_threshold must be a number in"),
        (dict(confidence_threshold=0.5), r"confidence_threshold=0.5 is not a setting of sampler='first_hitting'"),
        (dict(unmasking="margin", confidence_threshold=0.5, steps=4), "do not also set"),
        (dict(block_length=0), "block_length must be an integer"),
        (dict(remasking="always"), "remasking must be None or 'remdm'"),
        (dict(remasking="remdm"), "sampler='ancestral'"),
        (dict(sampler="ancestral", remasking="remdm", remasking_schedule="loop"), "remasking_schedule must be one of"),
        (dict(sampler="ancestral", remasking="remdm", remasking_schedule="conf", remasking_eta=0.1), "takes no remasking_eta"),
        (dict(use_cache="yes"), "use_cache must be True or False"),
        (dict(block_length=4, use_cache=True, cache_mode="suffix"), "cache_mode must be one of"),
        (dict(cache_refresh_steps=0), "cache_refresh_steps must be an integer"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            MDMGenerationConfig(**fields)


def test_remasking_with_noise_removal_and_blocks():
    model = tiny_model()
    for blocks in (None, 4):
        out = run(model, history=False, sampler="ancestral", steps=12, remasking="remdm", noise_removal=True,
                  block_length=blocks)
        assert not (out.sequences == model.config.mask_token_id).any()


def test_fewer_steps_than_blocks_is_an_error():
    with pytest.raises(ValueError, match="fewer than the 3 blocks"):
        run(tiny_model(), history=False, unmasking="confidence", steps=2, block_length=4)


def test_a_time_conditioned_network_sees_time_fall_under_confidence_ordering():
    model = tiny_model(time_conditioning=True)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("timesteps", args[2] if len(args) > 2 else None)),
                                                 with_kwargs=True)
    run(model, history=False, unmasking="confidence", steps=4)
    hook.remove()
    sigmas = [float(t[0]) for t in seen]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > sigmas[-1]
