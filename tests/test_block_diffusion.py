"""Block diffusion (BD3-LM, SDAR, Fast-dLLM v2): block-causal attention for every backbone, the training pass over
[x_t ; x_0], and generate() decoding block by block with an exact cache.

A block-diffusion model is factorised over its blocks: block b depends on the earlier blocks only, so its keys and
values, once the block is final, never change. The tests check the three consequences: logits in a block ignore
later blocks; cached and uncached generation are the same computation (bit-identical samples from one seed, every
strategy); and exact first-hitting sampling draws the model's own block-factorised joint.
"""

import functools
import itertools

import pytest
import torch
from scipy import stats

from hf_mdm import MDMConfig, MDMForMaskedDiffusion, MDMGenerationConfig, MDMLlamaConfig

from hf_mdm.configuration_mdm_gpt2 import MDMGPT2Config

from conftest import assert_float32_close, randomize_, tiny_gpt2_model, tiny_llama_model, tiny_model

B = 4  # the tests' block size

FAMILIES = {
    "dit": lambda **kw: tiny_model(seed=1, diffusion_block_size=B, **kw),
    "llama": lambda **kw: tiny_llama_model(seed=2, diffusion_block_size=B, **kw),
    "llama-shifted": lambda **kw: tiny_llama_model(seed=3, dream=True, diffusion_block_size=B, **kw),
    "gpt2-shifted": lambda **kw: tiny_gpt2_model(seed=4, diffusion_block_size=B, **kw),
}


def random_ids(batch, length, seed, low=2, high=50):
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# 1. Block-causal attention.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class", [MDMConfig, MDMLlamaConfig, MDMGPT2Config])
@pytest.mark.parametrize("value", [0, -4, 2.0, True, "4", 10_000])
def test_diffusion_block_size_is_validated(config_class, value):
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.diffusion_block_size must be None \(bidirectional\) "
                                         r"or an integer in \[1, max_position_embeddings="):
        config_class(vocab_size=51, hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                     diffusion_block_size=value)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_block_never_sees_later_blocks(family):
    model = FAMILIES[family]()
    ids = random_ids(2, 16, seed=4)
    ids[:, 5] = ids[:, 9] = model.config.mask_token_id
    with torch.no_grad():
        before = model(ids).logits
        for block in range(4):
            changed = ids.clone()
            changed[:, block * B:] = random_ids(2, 16 - block * B, seed=10 + block)
            after = model(changed).logits
            # Block b's logits (a shifted model's too: position bB reads position bB - 1) stay bit for bit ...
            assert torch.equal(after[:, : block * B], before[:, : block * B]), block
            # ... and the changed block's own logits do move (the mask lets a block see itself).
            assert not torch.allclose(after[:, block * B + 1:(block + 1) * B], before[:, block * B + 1:(block + 1) * B])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_blocks_count_from_each_rows_first_real_token(family, side):
    """A padded row gives the logits it gives alone: its blocks start at its first real token, whatever the padding."""
    model = FAMILIES[family]()
    alone = random_ids(1, 11, seed=5)
    alone[0, 6] = model.config.mask_token_id
    other = random_ids(1, 14, seed=6)
    pad = torch.zeros(1, 3, dtype=torch.long)
    row = torch.cat([pad, alone], 1) if side == "left" else torch.cat([alone, pad], 1)
    row_mask = torch.ones_like(row)
    if side == "left":
        row_mask[:, :3] = 0
    else:
        row_mask[:, 11:] = 0
    with torch.no_grad():
        batched = model(torch.cat([row, other]), attention_mask=torch.cat([row_mask, torch.ones_like(other)])).logits
        real = batched[0, 3:] if side == "left" else batched[0, :11]
        first = 1 if model.config.shift_logits else 0  # a shifted model has no prediction at a row's first token
        assert_float32_close(real[first:], model(alone).logits[0, first:])
        assert_float32_close(batched[1], model(other).logits[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_pass_gives_each_block_the_context_generation_gives_it(family):
    """model(x_t, clean_input_ids=x_0) at block b equals the model run on [x_0 of blocks < b, x_t of block b]: one
    pass computes every block's loss with exactly the context the sampler will give it (BD3-LM's vectorised form)."""
    model = FAMILIES[family]()
    clean = random_ids(2, 12, seed=7)
    noisy = clean.clone()
    noisy[torch.rand(noisy.shape, generator=torch.Generator().manual_seed(8)) < 0.5] = model.config.mask_token_id
    noisy[:, 0] = clean[:, 0]  # a shifted model never predicts the first position
    with torch.no_grad():
        paired = model(noisy, clean_input_ids=clean).logits
        for block in range(3):
            context = torch.cat([clean[:, : block * B], noisy[:, block * B:(block + 1) * B]], dim=1)
            assert_float32_close(paired[:, block * B:(block + 1) * B], model(context).logits[:, block * B:], msg=str(block))
        labels = clean.clone()
        loss = model(noisy, clean_input_ids=clean, labels=labels).loss
        assert torch.isfinite(loss) and loss > 0


def test_clean_input_ids_is_refused_where_it_means_nothing():
    ids = random_ids(1, 8, seed=9)
    with pytest.raises(ValueError, match="config.diffusion_block_size is None"):
        tiny_model()(ids, clean_input_ids=ids)
    with pytest.raises(ValueError, match=r"clean_input_ids must be integer ids of the shape of the input, \(1, 8\)"):
        FAMILIES["dit"]()(ids, clean_input_ids=ids[:, :4])


# ----------------------------------------------------------------------------------------------------------------
# 2. Generation: block by block, with an exact cache.
# ----------------------------------------------------------------------------------------------------------------


def padded_prompts(model, lengths=(6, 3, 9), seed=11):
    """Prompts of the given lengths (ending inside blocks, and one at a block boundary after the first), left-padded."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), model.config.pad_token_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = random_ids(1, n, seed=seed + row)
        if getattr(model.config, "bos_token_id", None) is not None:
            ids[row, width - n] = model.config.bos_token_id
        mask[row, width - n:] = 1
    return ids, mask


STRATEGY_SETTINGS = {
    "first_hitting": dict(sampler="first_hitting"),
    "first_hitting_k2": dict(sampler="first_hitting", tokens_per_step=2),
    "confidence": dict(sampler="confidence", order="margin", steps=20),
    "confidence_threshold": dict(sampler="confidence", confidence_threshold=0.3),
    "ancestral": dict(sampler="ancestral", steps=40),
    "ancestral_cache": dict(sampler="ancestral_cache", steps=40),
    "remdm": dict(sampler="remdm", steps=40, remasking_schedule="rescale"),
    "sub_blocks": dict(sampler="confidence", block_length=2, confidence_threshold=0.2),
    "dream": dict(sampler="dream", alg="entropy", steps=16),
    "sdar": dict(sampler="sdar", confidence_threshold=0.3),
    "sdar_static_2_steps": dict(sampler="sdar", remasking_strategy="low_confidence_static", denoising_steps=2),
    "sdar_sequential": dict(sampler="sdar", remasking_strategy="sequential"),
    "sdar_entropy_bounded": dict(sampler="sdar", remasking_strategy="entropy_bounded", entropy_bound=2.0),
    "fast_dllm_v2": dict(sampler="fast_dllm_v2", block_length=2, confidence_threshold=0.3),
    "token_editing": dict(sampler="token_editing", confidence_threshold=0.3, editing_threshold=0.2, max_post_steps=3),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", STRATEGY_SETTINGS)
def test_cached_and_uncached_generation_are_the_same_samples(family, setting):
    model = FAMILIES[family]()
    ids, mask = padded_prompts(model)
    settings = dict(STRATEGY_SETTINGS[setting], max_new_tokens=13, temperature=0.8, stop_at_eos=False,
                    return_dict_in_generate=True)
    uncached = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0), **settings)
    cached = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0), use_cache=True,
                            **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences.shape == (3, 9 + 13)  # laid out as the input: left-padded prompts, then new tokens
    assert torch.equal(cached.sequences[:, :9][mask.bool()], ids[mask.bool()])
    assert not (cached.sequences == model.config.mask_token_id).any()
    if setting == "first_hitting":  # one network call per token, with or without the cache
        assert (uncached.nfe_per_sequence == 13).all() and torch.equal(cached.nfe_per_sequence, uncached.nfe_per_sequence)
        assert torch.equal(cached.tokens_per_forward, torch.ones(3))


def test_the_cache_runs_each_finished_block_once():
    """Per call, the cached network runs on the active block (plus, on a block's first call, the block finished
    before it, or the prompt): far fewer positions than the canvas."""
    model = FAMILIES["llama"]()
    seen = []
    handle = model.model.register_forward_hook(lambda module, args, kwargs, output: seen.append(
        args[0].shape[1] if args else kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        prompt = random_ids(1, 6, seed=12)
        model.generate(prompt, max_new_tokens=14, use_cache=True, stop_at_eos=False)
    finally:
        handle.remove()
    # 20 positions in blocks [0,4) [4,8) [8,12) [12,16) [16,20); the prompt ends inside block 1.
    assert seen[0] == 8  # the prompt's full block and block 1 (2 prompt tokens, 2 to generate)
    assert seen[1] == 4  # block 1 again: its second token
    assert seen[2] == 8  # block 1, now final, and block 2
    assert sum(seen) < 20 * len(seen) / 2


def test_generation_settings_that_mean_nothing_under_block_diffusion_are_refused():
    model = FAMILIES["dit"]()
    prompt = random_ids(1, 4, seed=13)
    with pytest.raises(ValueError, match=r"block_length=3 must divide the model's diffusion_block_size=4"):
        model.generate(prompt, max_new_tokens=8, block_length=3)
    with pytest.raises(ValueError, match=r"cache_mode='dual' and cache_refresh_steps mean nothing for a block-diffusion"):
        model.generate(prompt, max_new_tokens=8, use_cache=True, cache_mode="dual")
    with pytest.raises(ValueError, match="stop_at_eos must be True, False or None"):
        MDMGenerationConfig(stop_at_eos="yes")


def test_a_row_stops_at_the_end_of_the_block_where_it_generated_eos():
    model = FAMILIES["dit"](eos_token_id=3)
    ids, mask = padded_prompts(model, lengths=(5, 2, 7))
    # Make EOS likely: its output bias dominates, so every row generates it early.
    with torch.no_grad():
        model.output_layer.linear.bias[3] += 8.0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, use_cache=True, return_dict_in_generate=True,
                         generator=torch.Generator().manual_seed(1))
    full = model.generate(ids, attention_mask=mask, max_new_tokens=20, use_cache=True, stop_at_eos=False,
                          generator=torch.Generator().manual_seed(1))
    lengths = mask.sum(1)
    for row in range(3):
        generated = out.sequences[row, 7:]
        position_of = lengths[row] + torch.arange(20)  # each generated token's position in its row
        eos = (generated == 3).nonzero().flatten()
        assert len(eos), "the test wants an EOS in every row"
        end_of_block = (position_of[eos[0]] // B + 1) * B  # the stop: the end of the first EOS's block
        kept = position_of < end_of_block
        assert not (generated[~kept] != model.config.pad_token_id).any()
        assert torch.equal(generated[kept], full[row, 7:][kept])  # before the stop: the same draws
        assert out.tokens_per_forward[row] == kept.sum() / out.nfe_per_sequence[row]


# ----------------------------------------------------------------------------------------------------------------
# Exact first-hitting sampling draws the block-factorised joint.
# ----------------------------------------------------------------------------------------------------------------

TOKENS, LENGTH, BLOCK = 3, 4, 2
SEQUENCES = torch.tensor(list(itertools.product(range(TOKENS), repeat=LENGTH)))


def oracle_block_model():
    """A block-causal DiT over 3 tokens (+ [MASK] = 3), 4 positions in blocks of 2, with weights large enough that
    its conditionals depend on the context (the law that ignores the block order is 0.067 away in total variation)
    and small enough that the joint is spread out (entropy 1.45 nats of at most 4.39)."""
    config = MDMConfig(vocab_size=TOKENS + 1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, cond_dim=8,
                       max_position_embeddings=8, dropout=0.0, diffusion_block_size=BLOCK)
    torch.manual_seed(0)
    return randomize_(MDMForMaskedDiffusion(config), seed=5, std=0.3)


def conditionals(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(ids).logits[..., :TOKENS].double(), dim=-1)


def pooled_chisquare(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Chi-square p-value of the counts against a law, the sequences expected fewer than 5 times pooled into one
    cell (the test's approximation needs about 5 per cell)."""
    expected = law * counts.sum()
    rare = expected < 5
    observed = torch.cat([counts[~rare], counts[rare].sum().reshape(1)])
    expected = torch.cat([expected[~rare], expected[rare].sum().reshape(1)])
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


def first_hitting_joint(model, blockwise: bool) -> torch.Tensor:
    """(81,) the law of exact FHS: at each step one masked position, uniformly chosen (within the active block when
    `blockwise`, else among all), is drawn from the model's conditional."""
    mask = TOKENS

    @functools.cache
    def conditional(state: tuple) -> torch.Tensor:
        return conditionals(model, torch.tensor([state]))[0]

    def probability(state: tuple, target: tuple) -> float:
        masked = [i for i, v in enumerate(state) if v == mask]
        if not masked:
            return 1.0
        if blockwise:
            first = min(masked) // BLOCK
            masked = [i for i in masked if i // BLOCK == first]
        p = conditional(state)
        total = 0.0
        for i in masked:
            nxt = list(state)
            nxt[i] = target[i]
            total += float(p[i, target[i]]) / len(masked) * probability(tuple(nxt), target)
        return total

    return torch.tensor([probability((mask,) * LENGTH, tuple(x.tolist())) for x in SEQUENCES], dtype=torch.float64)


@pytest.mark.slow
def test_first_hitting_samples_the_block_factorised_joint():
    model = oracle_block_model()
    joint = first_hitting_joint(model, blockwise=True)
    wrong = first_hitting_joint(model, blockwise=False)  # ignores the block order: another law for this network
    assert abs(float(joint.sum()) - 1) < 1e-9 and 0.5 * float((joint - wrong).abs().sum()) > 0.05
    samples = 20_000
    for use_cache in (False, True):
        out = model.generate(max_new_tokens=LENGTH, num_return_sequences=samples, use_cache=use_cache,
                             generator=torch.Generator().manual_seed(2), stop_at_eos=False)
        index = (out * TOKENS ** torch.arange(LENGTH - 1, -1, -1)).sum(-1)
        counts = torch.bincount(index, minlength=len(SEQUENCES)).double()
        assert pooled_chisquare(counts, joint) > 1e-3
        assert pooled_chisquare(counts, wrong) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# 4. Training: BD3-LM's NELBO and its two limits.
# ----------------------------------------------------------------------------------------------------------------


def test_the_block_nelbo_with_one_block_is_the_mdm_nelbo():
    from hf_mdm.training.objectives import get_objective

    bidirectional = tiny_model(seed=4)
    one_block = tiny_model(seed=4, diffusion_block_size=16)
    ids = random_ids(8, 16, seed=14)
    mdm, bd3 = get_objective("mdm", bidirectional.config), get_objective("mdm", one_block.config)
    noise = mdm.draw_noise(torch.Generator().manual_seed(3), 8, 16)
    block_noise = bd3.draw_noise(torch.Generator().manual_seed(3), 8, 16)
    assert torch.equal(block_noise.times[:, 0], noise.times) and torch.equal(block_noise.uniforms, noise.uniforms)
    with torch.no_grad():
        assert_float32_close(bd3.sequence_losses(one_block, ids, block_noise), mdm.sequence_losses(bidirectional, ids, noise))


def test_the_block_nelbo_with_blocks_of_one_token_is_the_autoregressive_nll():
    from hf_mdm.training.objectives import T_MIN, Noise, get_objective

    model = tiny_model(seed=5, diffusion_block_size=1)
    objective = get_objective("mdm", model.config)
    ids = random_ids(4, 12, seed=15)
    mask = model.config.mask_token_id
    with torch.no_grad():
        # The model's autoregressive NLL: token l given the clean tokens before it (and [MASK] in its own place).
        nll = torch.stack([torch.nn.functional.cross_entropy(
            model(torch.cat([ids[:, :l], torch.full((4, 1), mask)], 1)).logits[:, l], ids[:, l], reduction="none")
            for l in range(12)], dim=1)
        # Exact: every token masked at one known time is the NLL times the weight w(t).
        s = torch.tensor(0.37, dtype=torch.float64)
        losses = objective.sequence_losses(model, ids, Noise(torch.full((4, 12), float(s), dtype=torch.float64),
                                                             torch.zeros(4, 12)))
        t = T_MIN + (1 - T_MIN) * s
        weight = (1 - T_MIN) * objective.schedule.loss_weight(t)
        assert_float32_close(losses, (weight * nll.double().mean(-1)).float(), ulps=64)
        # In expectation over the noise: the NLL times alpha(T_MIN) - alpha(1).
        draws = torch.stack([objective.sequence_losses(model, ids, objective.draw_noise(torch.Generator().manual_seed(k), 4, 12))
                             for k in range(400)])
    alpha = objective.schedule.alpha
    expected = nll.double().mean(-1) * float(alpha(torch.tensor(T_MIN)) - alpha(torch.tensor(1.0)))
    error = draws.double().std(0) / 400 ** 0.5
    assert ((draws.double().mean(0) - expected).abs() < 4 * error).all()


def test_the_validation_bound_of_one_block_is_the_mdm_validation_bound():
    """validation_loss draws one time per row: a block-diffusion model spreads it over its blocks (the same
    expectation); with a single block it is the MDM's own bound, to the last float32 ulps."""
    from hf_mdm.training.objectives import validation_loss

    ids = random_ids(6, 16, seed=16)
    def bound(**block):
        return validation_loss(tiny_model(seed=4, **block), ids, "mdm", batch_size=4, num_passes=2).nats_per_token

    one_block, bidirectional, blocks = bound(diffusion_block_size=16), bound(), bound(diffusion_block_size=4)
    assert one_block == pytest.approx(bidirectional, rel=1e-6) and blocks != pytest.approx(bidirectional, rel=1e-3)


def test_a_shifted_block_model_masks_whole_blocks_at_their_own_time():
    """A shifted model's first position is never masked; the others take the time of THEIR block (positions counted
    from the row's start), so each block is noised at one time, as BD3-LM's NELBO needs."""
    from hf_mdm.training.objectives import Noise, get_objective

    model = FAMILIES["llama-shifted"]()
    objective = get_objective("mdm", model.config)
    seen = []
    objective.network_logits = lambda model, noisy, clean, t: (seen.append(noisy), model(noisy, clean_input_ids=clean).logits)[1]
    ids = random_ids(1, 16, seed=17)
    # Blocks 0 and 2 at time 0.1, blocks 1 and 3 at 0.9; every uniform 0.5: only blocks 1 and 3 are masked.
    objective.sequence_losses(model, ids, Noise(torch.tensor([[0.1, 0.9, 0.1, 0.9]], dtype=torch.float64),
                                                torch.full((1, 16), 0.5)))
    masked = (seen[0][0] == model.config.mask_token_id).nonzero().flatten().tolist()
    assert masked == [4, 5, 6, 7, 12, 13, 14, 15]
