"""Dream's own decoding (sampler="dream"), token for token against an independent reference of Dream's loop
(tests/dream_decoding_reference.py, written from Dream's generation_utils.py): every algorithm, steps below the
number of new tokens, batched and left-padded prompts, Fast-dLLM's threshold rule; and a converted Dream folder
decodes with Dream's defaults."""

import pytest
import torch

from hf_mdm import MASK_LOGIT, MDMGenerationConfig
from hf_mdm.sampling_mdm import DREAM_ALGS, dream_filtered_logits

from conftest import tiny_llama_model
from dream_decoding_reference import dream_filtered_logits as reference_filtered_logits
from dream_decoding_reference import dream_reference_generate, dream_step_counts


@pytest.fixture(scope="module")
def dream():
    return tiny_llama_model(seed=3, dream=True, vocab_size=64, max_position_embeddings=64)


def raw_logits(model):
    """The network's own output, unshifted (Dream's loop shifts it), with [MASK]'s logit at MASK_LOGIT as hf_mdm's
    head returns it (a Dream network that drew [MASK] would leave the position masked; hf_mdm's never predicts it)."""

    def network(x, attention_mask, position_ids):
        with torch.no_grad():
            logits = model.lm_head(model.model(x, attention_mask=attention_mask).last_hidden_state)
        logits[..., model.config.mask_token_id] = MASK_LOGIT
        return logits

    return network


def prompts(model, batch: int):
    """`batch` prompts of lengths 6, 3, 5, ... starting with BOS, left-padded, and their attention mask."""
    lengths = [6, 3, 5, 4][:batch]
    width = max(lengths)
    generator = torch.Generator().manual_seed(batch)
    ids = torch.full((batch, width), model.config.pad_token_id)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 50, (n,), generator=generator)
        ids[row, width - n] = model.config.bos_token_id
        mask[row, width - n:] = 1
    return ids, (mask if batch > 1 else None)


SHAPES = [(16, 8), (16, 5), (12, 7), (20, 3), (16, 16)]  # (max_new_tokens, steps): steps below the new tokens but one


@pytest.mark.parametrize("alg", DREAM_ALGS)
@pytest.mark.parametrize("batch", [1, 3])
def test_dream_decoding_matches_dreams_loop(dream, alg, batch):
    ids, mask = prompts(dream, batch)
    agree = []
    for new_tokens, steps in SHAPES:
        for filters in ({}, {"top_p": 0.95}, {"top_k": 5}):
            expected = dream_reference_generate(
                raw_logits(dream), ids, mask, max_new_tokens=new_tokens, steps=steps, alg=alg, temperature=0.0,
                mask_token_id=dream.config.mask_token_id, generator=torch.Generator().manual_seed(11),
                mask_format="2d", top_p=filters.get("top_p"), top_k=filters.get("top_k"))
            ours = dream.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, sampler="dream", alg=alg,
                                  steps=steps, temperature=0.0, generator=torch.Generator().manual_seed(11),
                                  return_dict_in_generate=True, **filters)
            agree.append(torch.equal(ours.sequences, expected))
            # Dream makes `steps` calls; origin can reveal everything sooner, and hf_mdm then stops
            assert ours.nfe == steps if alg != "origin" else ours.nfe <= steps
    assert all(agree), f"{agree.count(False)} of {len(agree)} settings differ from Dream's loop"


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
def test_alg_temp_chooses_positions_as_dream_does(dream, alg):
    ids, mask = prompts(dream, 3)
    for new_tokens, steps in SHAPES[:3]:
        expected = dream_reference_generate(
            raw_logits(dream), ids, mask, max_new_tokens=new_tokens, steps=steps, alg=alg, alg_temp=0.5,
            mask_token_id=dream.config.mask_token_id, generator=torch.Generator().manual_seed(5), mask_format="2d")
        ours = dream.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, sampler="dream", alg=alg,
                              alg_temp=0.5, steps=steps, temperature=0.0, generator=torch.Generator().manual_seed(5))
        assert torch.equal(ours, expected)


def test_fast_dllm_threshold_rule_for_dream(dream):
    ids, _ = prompts(dream, 1)
    for threshold in (0.05, 0.2, 0.6):
        for new_tokens, steps in ((16, 8), (12, 4), (16, 16)):
            expected = dream_reference_generate(
                raw_logits(dream), ids, None, max_new_tokens=new_tokens, steps=steps, alg="maskgit_plus",
                threshold=threshold, mask_token_id=dream.config.mask_token_id, mask_format="2d")
            ours = dream.generate(ids, max_new_tokens=new_tokens, sampler="dream", steps=steps,
                                  confidence_threshold=threshold, temperature=0.0)
            assert torch.equal(ours, expected), (threshold, new_tokens, steps)


def test_dreams_counts_per_call():
    """int(n (1 - s/t)) on linspace(1, eps, steps + 1), the rest on the last call: the issue's figures."""
    assert dream_step_counts(16, 16) == [0] + [1] * 14 + [2]
    assert dream_step_counts(16, 8) == [1, 2, 2, 2, 2, 2, 2, 3]
    model = tiny_llama_model(seed=3, dream=True, vocab_size=64, max_position_embeddings=64)
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=16, sampler="dream", alg="entropy", steps=8,
                         temperature=0, output_history=True, return_dict_in_generate=True)
    masked = [int((draft == model.config.mask_token_id).sum()) for draft in out.history]
    assert [a - b for a, b in zip([16] + masked, masked)] == [1, 2, 2, 2, 2, 2, 2, 3]


def test_scores_come_from_the_tempered_filtered_distribution():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p, top_k in ((0.2, 0.95, 0), (1.0, 1.0, 5), (0.0, 0.9, 0), (0.7, 0.8, 7)):
        ours = dream_filtered_logits(logits, temperature, top_p, top_k)
        reference = reference_filtered_logits(logits, temperature, top_p if top_p < 1 else None, top_k or None)
        assert torch.equal(ours, reference)


def test_dream_settings_are_validated():
    for fields, message in [(dict(alg="lowest"), "alg must be one of"), (dict(eps=1.0), "eps must be"),
                            (dict(alg_temp=-1.0), "alg_temp must be"),
                            (dict(alg="entropy", confidence_threshold=0.5), "alg must be 'maskgit_plus'")]:
        with pytest.raises(ValueError, match=message):
            MDMGenerationConfig(sampler="dream", **fields)
