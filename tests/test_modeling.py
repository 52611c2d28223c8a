"""The model as a transformers citizen, in the style of transformers' own model tests: a tester builds a tiny config
and inputs, and each test checks one convention (outputs, loss, embeddings, attention implementations, compilation,
loading) against an independent computation."""

import json
import os
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForMaskedLM, Trainer, TrainingArguments

from hf_mdm import MASK_LOGIT, MDMForMaskedDiffusion, MDMLlamaForMaskedDiffusion, MDMLlamaModel, MDMModel
from hf_mdm.pretrained import DEFAULT_MDM, pretrained_path

from conftest import assert_float32_close, randomize_, run_without_hf_mdm, tiny_config, tiny_llama_config, tiny_llama_model, tiny_model


class MDMModelTester:
    """A tiny model of one family and its inputs: 3 rows of length 14 (row 1 left-padded by 4, row 2 right-padded
    by 5), about a third of the positions masked. Families: "dit" (MDLM's DiT), "llada" (bidirectional Llama) and
    "dream" (Qwen2-style: q/k/v biases, grouped-query heads, logits shifted inside the model)."""

    batch_size, seq_len = 3, 14

    def __init__(self, family="dit", **config_overrides):
        self.family = family
        self.config_overrides = config_overrides
        self.model_class = MDMForMaskedDiffusion if family == "dit" else MDMLlamaForMaskedDiffusion
        self.default_theta = 10000.0 if family == "dit" else 500000.0

    def config(self, **overrides):
        fields = {**self.config_overrides, **overrides}
        if self.family == "dit":
            return tiny_config(**fields)
        return tiny_llama_config(dream=self.family == "dream", **fields)

    def model(self, seed=0, **overrides):
        torch.manual_seed(seed)
        return randomize_(self.model_class(self.config(**overrides)), seed=seed)

    def inputs(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        config = self.config()
        labels = torch.randint(2, config.mask_token_id, (self.batch_size, self.seq_len), generator=generator)
        masked = torch.rand(self.batch_size, self.seq_len, generator=generator) < 0.35
        input_ids = labels.masked_fill(masked, config.mask_token_id)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :4] = 0
        attention_mask[2, -5:] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
        return dict(input_ids=input_ids, attention_mask=attention_mask), labels

    def next_hidden_state(self, model, index, hidden, base, inputs):
        """hidden_states[index + 1] recomputed from hidden_states[index] with block `index` alone."""
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        rope = model.model.rotary_emb(hidden, positions)
        mask = inputs["attention_mask"].bool()[:, None, None, :]
        block = model.model.layers[index]
        if self.family == "dit":
            return block(hidden, base.conditioning, rope, mask)
        out = block(hidden, rope, mask)
        return model.model.norm(out) if index == len(model.model.layers) - 1 else out


FAMILIES = ["dit", "llada", "dream"]


@pytest.fixture(params=FAMILIES)
def tester(request):
    return MDMModelTester(request.param)


def random_ids(batch, seq_len, vocab=50, seed=0):
    return torch.randint(1, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Outputs: logits, the [MASK] logit, output_positions, hidden states, attentions, tuples.
# ---------------------------------------------------------------------------------------------------------------


def test_forward_shapes_and_mask_logit(model):
    ids = random_ids(3, 12)
    ids[:, ::3] = model.config.mask_token_id
    logits = model(ids).logits
    assert logits.shape == (3, 12, model.config.vocab_size)
    assert (logits[..., model.config.mask_token_id] == MASK_LOGIT).all()
    assert torch.isfinite(logits).all()
    for dtype in (torch.float64, torch.float32):  # SUBS: [MASK] has probability exactly zero
        assert (torch.softmax(logits.to(dtype), -1)[..., model.config.mask_token_id] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_logit_never_becomes_nan_in_half_precision(tester, dtype):
    model = tester.model().to(dtype)
    inputs, labels = tester.inputs()
    output = model(**inputs, labels=labels)
    logits = output.logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    mask_id = model.config.mask_token_id
    probs = torch.softmax(logits, -1)
    log_probs = F.log_softmax(logits, -1)
    assert torch.isfinite(probs).all() and (probs[..., mask_id] == 0).all()
    assert torch.isfinite(log_probs).all()
    entropy = -(probs * log_probs).sum(-1)  # 0 * log 0 would be NaN with a -inf logit
    assert torch.isfinite(entropy).all()
    assert torch.isfinite(model(**inputs).logits.float().half()).all()  # casts stay finite
    difference = logits - model(**inputs).logits  # -inf - -inf would be NaN
    assert (difference == 0).all()
    assert torch.isfinite(output.loss) and output.loss > 0


def test_output_positions_match_full_logits(model):
    ids = random_ids(2, 16)
    full = model(ids).logits
    positions = torch.tensor([[0, 5, 15], [7, 7, 2]])
    partial = model(ids, output_positions=positions).logits
    assert partial.shape == (2, 3, model.config.vocab_size)
    expected = torch.stack([full[b, positions[b]] for b in range(2)])
    assert_float32_close(partial, expected)  # a projection of 3 rows, not 16: another blocking of the same sums


def test_hidden_states_embeddings_first_then_every_block(tester):
    model = tester.model()
    inputs, _ = tester.inputs()
    output = model(**inputs, output_hidden_states=True)
    hidden = output.hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1
    assert all(h.shape == (tester.batch_size, tester.seq_len, model.config.hidden_size) for h in hidden)
    torch.testing.assert_close(hidden[0], model.model.embed_tokens(inputs["input_ids"]), rtol=0, atol=0)
    base = model.model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(hidden[-1], base.last_hidden_state, rtol=0, atol=0)
    # Each hidden state is the previous one passed through its block (the last one through the final norm too).
    for i in range(model.config.num_hidden_layers):
        recomputed = tester.next_hidden_state(model, i, hidden[i], base, inputs)
        assert_float32_close(recomputed, hidden[i + 1])
    assert model(**inputs).hidden_states is None


def test_attentions_come_from_eager_and_sdpa_falls_back_with_a_warning(tester, caplog):
    eager = tester.model(attn_implementation="eager")
    inputs, _ = tester.inputs()
    output = eager(**inputs, output_attentions=True)
    attentions = output.attentions
    config = eager.config
    assert len(attentions) == config.num_hidden_layers
    assert all(a.shape == (tester.batch_size, config.num_attention_heads, tester.seq_len, tester.seq_len) for a in attentions)
    for a in attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=0, atol=1e-5)
        assert (a[1, :, :, :4] == 0).all() and (a[2, :, :, -5:] == 0).all()  # padding is never attended to

    sdpa = tester.model()
    assert sdpa.config._attn_implementation == "sdpa"
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    from hf_mdm import modeling_mdm_common as modeling_mdm

    type(modeling_mdm.logger).warning_once.cache_clear()  # warned once per message and process
    with caplog.at_level("WARNING"):
        fallback = sdpa(**inputs, output_attentions=True)
    assert "falling back to eager" in caplog.text
    for ours, reference in zip(fallback.attentions, attentions):
        assert_float32_close(ours, reference)  # eager fallback vs eager: the same sums
    torch.testing.assert_close(fallback.logits, output.logits, rtol=1e-4, atol=1e-5)
    assert sdpa(**inputs).attentions is None


def test_output_flags_settable_in_the_config(tester):
    model = tester.model(output_hidden_states=True, attn_implementation="eager")
    model.config.output_attentions = True
    inputs, _ = tester.inputs()
    output = model(**inputs)
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1
    assert len(output.attentions) == model.config.num_hidden_layers
    assert model(**inputs, output_hidden_states=False, output_attentions=False).hidden_states is None


def test_return_dict_false_gives_tuples_in_field_order(tester):
    model = tester.model(attn_implementation="eager")
    inputs, labels = tester.inputs()
    as_dict = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
    as_tuple = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
    torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)
    assert len(as_tuple[2]) == len(as_dict.hidden_states) and len(as_tuple[3]) == len(as_dict.attentions)
    logits_only = model(**inputs, return_dict=False)
    assert len(logits_only) == 1 and torch.equal(logits_only[0], as_dict.logits)
    base = model.model(**inputs, return_dict=False)
    assert isinstance(base, tuple) and torch.equal(base[0], model.model(**inputs).last_hidden_state)
    model.config.return_dict = False
    assert isinstance(model(**inputs), tuple)


def test_inputs_embeds_equal_input_ids(tester):
    model = tester.model()
    inputs, labels = tester.inputs()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_ids = model(**inputs)
    from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(from_embeds.logits, from_ids.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(inputs["input_ids"], inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(attention_mask=inputs["attention_mask"])


def test_unknown_keyword_arguments_are_refused(model):
    ids = random_ids(1, 5)
    with pytest.raises(TypeError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(TypeError, match="use_cache"):
        model.model(ids, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------
# labels and loss; Trainer.
# ---------------------------------------------------------------------------------------------------------------


def test_loss_is_the_mean_cross_entropy_over_masked_real_positions(tester):
    model = tester.model()
    inputs, labels = tester.inputs()
    output = model(**inputs, labels=labels)
    mask_id = model.config.mask_token_id
    scored = (inputs["input_ids"] == mask_id) & inputs["attention_mask"].bool()
    if tester.family == "dream":  # a shifted model never scores a row's first real position
        first_real = inputs["attention_mask"].argmax(dim=1)
        scored[torch.arange(tester.batch_size), first_real] = False
    log_probs = torch.log_softmax(output.logits.double(), -1)
    nll = -log_probs.gather(-1, labels[..., None])[..., 0]
    expected = nll[scored].sum() / scored.sum()
    assert scored.sum() >= 8
    torch.testing.assert_close(output.loss.double(), expected, rtol=1e-5, atol=0)

    # -100 labels are left out; num_items_in_batch replaces the count; no scored position gives 0, not NaN.
    ignored = labels.clone()
    first = scored.nonzero()[0]
    ignored[first[0], first[1]] = -100
    kept = scored.clone()
    kept[first[0], first[1]] = False
    torch.testing.assert_close(model(**inputs, labels=ignored).loss.double(), nll[kept].sum() / kept.sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(model(**inputs, labels=labels, num_items_in_batch=100).loss.double(),
                               nll[scored].sum() / 100, rtol=1e-5, atol=0)
    clean = model(labels.clone(), labels=labels).loss
    assert clean.item() == 0.0 and clean.requires_grad

    # With output_positions, the labels are read at those positions.
    positions = scored.long().argsort(dim=1, descending=True, stable=True)[:, :3]
    partial = model(**inputs, labels=labels, output_positions=positions)
    chosen = scored.gather(1, positions)
    expected = nll.gather(1, positions)[chosen].sum() / chosen.sum()
    torch.testing.assert_close(partial.loss.double(), expected, rtol=1e-5, atol=0)


def test_loss_backpropagates_and_the_mask_column_gets_no_gradient(tester):
    model = tester.model()
    inputs, labels = tester.inputs()
    model(**inputs, labels=labels).loss.backward()
    grad = model.get_output_embeddings().weight.grad
    assert grad.abs().sum() > 0
    assert (grad[model.config.mask_token_id] == 0).all()


def test_trainer_trains_one_step(tmp_path, tester):
    """Labels are the clean ids everywhere (no -100): Trainer's loss is the model's own, the masked-token mean."""
    model = tester.model().train()
    mask_id = model.config.mask_token_id
    clean = torch.randint(2, mask_id, (4, tester.seq_len), generator=torch.Generator().manual_seed(0))

    def collate(rows):
        input_ids = torch.stack([row["input_ids"] for row in rows])
        masked = (torch.arange(input_ids.shape[1]) % 2 == 1).expand_as(input_ids)  # the same masking every time
        return dict(input_ids=input_ids.masked_fill(masked, mask_id), labels=input_ids)

    batch = collate([{"input_ids": row} for row in clean])
    expected = model(**batch).loss.item()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": row} for row in clean], data_collator=collate)
    result = trainer.train()
    assert result.global_step == 1
    assert result.training_loss == pytest.approx(expected, rel=1e-5)
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())]
    head = next(name for name, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    assert head in changed and any(".qkv_proj." in name or ".q_proj." in name for name in changed)


def test_a_shifted_model_never_scores_its_first_real_position():
    model = tiny_llama_model(dream=True)
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [7, 8, 9, 10, 11, 12]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = ids.clone()
    only_first = ids.clone()
    only_first[0, 2] = only_first[1, 0] = model.config.mask_token_id
    assert model(only_first, attention_mask=attention, labels=labels).loss.item() == 0.0
    second = ids.clone()
    second[0, 3] = model.config.mask_token_id
    assert model(second, attention_mask=attention, labels=labels.int()).loss.item() > 0  # int32 labels are fine


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long)), "labels"),
        (lambda m: m(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(5, dtype=torch.long)), "labels"),
    ],
)
def test_labels_of_the_wrong_shape(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings: accessors, resize, tying.
# ---------------------------------------------------------------------------------------------------------------


def test_embedding_accessors(model):
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.output_layer.linear
    new_input = torch.nn.Embedding(model.config.vocab_size, model.config.hidden_size)
    new_output = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    model.set_input_embeddings(new_input)
    model.set_output_embeddings(new_output)
    assert model.model.embed_tokens is new_input and model.output_layer.linear is new_output


def test_resize_token_embeddings_grows_both_ends_and_keeps_the_mask_id(tmp_path, tester):
    model = tester.model()
    ids = random_ids(2, 10)
    ids[:, 3] = model.config.mask_token_id
    before = model(ids).logits
    old_vocab, mask_id = model.config.vocab_size, model.config.mask_token_id
    model.resize_token_embeddings(old_vocab + 6)
    assert model.config.vocab_size == old_vocab + 6 and model.config.mask_token_id == mask_id
    assert model.get_input_embeddings().weight.shape[0] == old_vocab + 6
    assert model.get_output_embeddings().weight.shape[0] == old_vocab + 6
    if model.get_output_embeddings().bias is not None:  # the DiT's output layer has one
        assert model.get_output_embeddings().bias.shape[0] == old_vocab + 6
    after = model(ids).logits
    assert after.shape[-1] == old_vocab + 6 and torch.isfinite(after).all()
    # New rows as transformers initialises them (mean_resizing): drawn around the mean of the old rows.
    weights = model.get_input_embeddings().weight.detach()
    old_rows, new_rows = weights[:old_vocab], weights[old_vocab:]
    spread = (old_rows - old_rows.mean(0)).norm(dim=1).mean()
    assert ((new_rows - old_rows.mean(0)).norm(dim=1) < 3 * spread).all()  # (the mean alone when the covariance is singular)
    assert_float32_close(after[..., :old_vocab], before)  # old rows are kept (a wider projection: other blocking)
    assert (after[..., mask_id] == MASK_LOGIT).all()
    new_ids = ids.clone()
    new_ids[:, 0] = old_vocab + 5  # a new token is readable
    assert torch.isfinite(model(new_ids).logits).all()
    # The resized model saves and reloads as itself.
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.config.vocab_size == old_vocab + 6
    torch.testing.assert_close(reloaded(new_ids).logits, model(new_ids).logits, rtol=0, atol=0)
    model.resize_token_embeddings(mask_id + 1)  # shrinking down to the mask id is allowed
    with pytest.raises(ValueError, match="mask_token_id"):
        model.resize_token_embeddings(mask_id)


def test_resize_refuses_to_drop_special_ids(tester):
    model = tester.model(eos_token_id=45, mask_token_id=10)
    with pytest.raises(ValueError, match="eos_token_id=45"):
        model.resize_token_embeddings(44)


def test_tied_embeddings_share_one_matrix(tmp_path, tester):
    model = tester.model(tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.resize_token_embeddings(model.config.vocab_size + 3)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    ids = random_ids(2, 7)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not tester.model().get_output_embeddings().weight is tester.model().get_input_embeddings().weight


# ---------------------------------------------------------------------------------------------------------------
# Attention implementations, padding, batching, determinism, gradient checkpointing.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_row_matches_the_sequence_alone(side, attn):
    model = tiny_model(attn_implementation=attn)
    assert model.config._attn_implementation == attn
    alone = random_ids(1, 9, seed=1)
    other = random_ids(1, 14, seed=2)
    pad = torch.zeros(1, 5, dtype=torch.long)
    row = torch.cat([pad, alone], 1) if side == "left" else torch.cat([alone, pad], 1)
    row_mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], 1) if side == "left" else torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], 1)
    batch = torch.cat([row, other])
    mask = torch.cat([row_mask, torch.ones(1, 14)]).long()
    batched = model(batch, attention_mask=mask).logits
    real = batched[0, 5:] if side == "left" else batched[0, :9]
    assert_float32_close(real, model(alone).logits[0])  # other shapes (a padded batch): reordered float32 sums
    assert_float32_close(batched[1], model(other).logits[0])


def test_an_all_ones_mask_equals_no_mask(tester):
    model = tester.model()
    ids = random_ids(2, 11)
    # With a mask SDPA takes another kernel than without one: the same sums in another order.
    assert_float32_close(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)


def test_determinism_and_batch_independence(tester):
    model = tester.model()
    inputs, _ = tester.inputs()
    first, second = model(**inputs).logits, model(**inputs).logits
    assert torch.equal(first, second)
    for row in range(tester.batch_size):
        alone = model(inputs["input_ids"][row : row + 1], attention_mask=inputs["attention_mask"][row : row + 1]).logits
        torch.testing.assert_close(alone[0], first[row], rtol=1e-5, atol=1e-5)


# transformers' own tolerances for eager vs SDPA on CPU (tests/test_modeling_common.py): (atol, rtol) per dtype.
EAGER_SDPA_TOLERANCE = {torch.float32: (1e-6, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize("dtype", list(EAGER_SDPA_TOLERANCE), ids=str)
@pytest.mark.parametrize("padding", ["none", "left", "right", "no_mask"])
def test_eager_matches_sdpa(tester, dtype, padding):
    """At the scale of the model's own initializer_range (as transformers' tests run it), every weight random."""
    std = tester.config().initializer_range
    sdpa = randomize_(tester.model_class(tester.config()), std=std).to(dtype)
    eager = randomize_(tester.model_class(tester.config(attn_implementation="eager")), std=std).to(dtype)
    ids = random_ids(3, 14, seed=3)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "right":
        mask[1, -5:] = 0
    kwargs = {} if padding == "no_mask" else {"attention_mask": mask}
    ours = sdpa(ids, output_hidden_states=True, **kwargs)
    reference = eager(ids, output_hidden_states=True, **kwargs)
    atol, rtol = EAGER_SDPA_TOLERANCE[dtype]
    real = mask.bool()
    for name, a, b in (("last hidden state", ours.hidden_states[-1][real], reference.hidden_states[-1][real]),
                       ("logits", ours.logits[real], reference.logits[real])):
        # transformers' rule for bfloat16: its 8-bit mantissa scales the tolerance with the outputs' magnitude.
        tolerance = max(atol, 3e-2 * float(b.detach().abs().max())) if dtype == torch.bfloat16 else atol
        torch.testing.assert_close(a, b, atol=tolerance, rtol=rtol, msg=name)
    if dtype == torch.float32 and padding in ("left", "right"):  # the comparison can fail: padding is visible
        unmasked = sdpa(ids).logits[real]
        assert (unmasked - reference.logits[real]).abs().max() > 100 * atol


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    inputs, labels = tester.inputs()

    def gradients(checkpointing):
        model = (tester.model(time_conditioning=True) if tester.family == "dit" else tester.model()).train()
        if checkpointing:
            with warnings.catch_warnings():  # transformers 5.2x renames it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        sigma = torch.tensor([0.3, 1.2, 4.0])
        calls = []
        hook = model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        model(**inputs, labels=labels, timesteps=sigma).loss.backward()
        hook.remove()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(calls)

    (plain, plain_calls), (checkpointed, checkpointed_calls) = gradients(False), gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # checkpointing recomputes the block in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_time_conditioning_switch():
    ids = random_ids(2, 10)
    conditioned = tiny_model(time_conditioning=True)
    a = conditioned(ids, timesteps=torch.tensor([0.1, 0.1])).logits
    b = conditioned(ids, timesteps=torch.tensor([2.0, 2.0])).logits
    assert (a - b)[..., :-1].abs().max() > 1e-3
    agnostic = tiny_model(time_conditioning=False)
    a = agnostic(ids, timesteps=torch.tensor([0.1, 0.1])).logits
    b = agnostic(ids, timesteps=torch.tensor([2.0, 2.0])).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, agnostic(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="timesteps"):
        conditioned(ids)


# ---------------------------------------------------------------------------------------------------------------
# RoPE settings: transformers 5's rope_parameters, old rope_theta configs.
# ---------------------------------------------------------------------------------------------------------------


def test_rope_parameters_and_old_rope_theta_configs(tmp_path, tester):
    config = tester.config()
    theta = tester.default_theta
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": theta}
    model = tester.model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == theta
    # A config.json written before rope_parameters (top-level rope_theta) loads to the same model.
    saved.pop("rope_parameters")
    saved["rope_theta"] = theta
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = AutoModel.from_pretrained(tmp_path)
    assert old.config.rope_parameters == {"rope_type": "default", "rope_theta": theta}
    ids = random_ids(2, 9)
    torch.testing.assert_close(old(ids).logits, model(ids).logits, rtol=0, atol=0)
    # The base is read: another theta changes the logits; linear scaling by 1 is the default embedding.
    other = tester.model(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert (other(ids).logits - model(ids).logits).abs().max() > 1e-3
    linear = tester.model(rope_parameters={"rope_type": "linear", "rope_theta": theta, "factor": 1.0})
    assert_float32_close(linear(ids).logits, model(ids).logits)
    # A scaled rotary type extends the context, as in transformers' models: dynamic keeps the default frequencies up to
    # max_position_embeddings and rescales them past it. With the default type forward runs a longer sequence too
    # (transformers' convention), but generate() refuses a canvas past the trained length.
    dynamic = tester.model(rope_parameters={"rope_type": "dynamic", "rope_theta": theta, "factor": 2.0})
    assert_float32_close(dynamic(ids).logits, model(ids).logits)
    longer = random_ids(1, model.config.max_position_embeddings + 8)
    assert torch.isfinite(dynamic(longer).logits).all() and torch.isfinite(model(longer).logits).all()
    assert not torch.equal(dynamic.model.rotary_emb.inv_freq, dynamic.model.rotary_emb.original_inv_freq)
    prompt = longer[:, :2]
    assert dynamic.generate(prompt, max_new_tokens=longer.shape[1] - 2, temperature=0).shape[1] == longer.shape[1]
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        model.generate(prompt, max_new_tokens=longer.shape[1] - 2)
    with pytest.raises(ValueError, match="rope_type"):
        tester.config(rope_parameters={"rope_type": "nonsense", "rope_theta": 10000.0})


def test_adaln_zero_initialisation():
    """A fresh DiT starts as MDLM's does: every block the identity (its adaLN modulation zero) and the output layer
    zero, so every logit but [MASK]'s is 0. transformers initialises only modules with parameters of their own, so the
    zeroing is done on the layers themselves (it was once written on the blocks and never ran)."""
    from hf_mdm import MDMConfig

    model = MDMForMaskedDiffusion(tiny_config())
    for block in model.model.layers:
        assert not block.modulation.weight.any() and not block.modulation.bias.any()
        assert block.self_attn.qkv_proj.weight.std() > 0.01  # the rest is initialised as usual
    assert not model.output_layer.linear.weight.any() and not model.output_layer.modulation.weight.any()
    logits = model(random_ids(2, 9)).logits
    assert not logits[..., : model.config.mask_token_id].any()
    assert isinstance(model.config, MDMConfig)


# ---------------------------------------------------------------------------------------------------------------
# No host synchronisation: meta tensors, torch.compile(fullgraph=True), torch.export.
# ---------------------------------------------------------------------------------------------------------------


def test_forward_reads_no_values_off_the_cpu(tester):
    """On a device whose values cannot be read (meta), forward still runs: it never synchronises with the host."""
    with torch.device("meta"):
        model = tester.model_class(tester.config())
    inputs, labels = tester.inputs()
    meta = {k: v.to("meta") for k, v in inputs.items()}
    output = model(**meta, labels=labels.to("meta"), output_positions=torch.zeros(3, 2, dtype=torch.long, device="meta"))
    assert output.logits.shape == (3, 2, model.config.vocab_size) and output.logits.device.type == "meta"
    if tester.family == "dit":
        conditioned = MDMForMaskedDiffusion(tester.config(time_conditioning=True)).to("meta")
        conditioned(**meta, timesteps=torch.ones(3, device="meta"))


def test_compiles_with_fullgraph(tester):
    model = tester.model()
    inputs, labels = tester.inputs()
    positions = torch.tensor([[0, 3], [5, 13], [2, 2]])
    expected = model(**inputs, labels=labels, output_positions=positions)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    output = compiled(**inputs, labels=labels, output_positions=positions)
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_torch_export(tester):
    model = tester.model()
    inputs, _ = tester.inputs()
    positions = torch.tensor([[0, 3], [5, 13], [2, 2]])
    exported = torch.export.export(model, args=(), kwargs=dict(**inputs, output_positions=positions))
    output = exported.module()(**inputs, output_positions=positions)
    torch.testing.assert_close(output.logits, model(**inputs, output_positions=positions).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, remote code, dtypes and device maps.
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_and_auto_classes(tmp_path, model):
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    from hf_mdm.constants import travelling_files

    assert {"model.safetensors", "config.json", *travelling_files("mdm")} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    ids = random_ids(2, 11)
    expected = model(ids).logits
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        loaded = auto_class.from_pretrained(tmp_path)
        assert type(loaded) is MDMForMaskedDiffusion
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    base = MDMModel.from_pretrained(tmp_path)
    torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(tmp_path, model, dtype):
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=dtype)
    assert next(loaded.parameters()).dtype == dtype
    ids = random_ids(2, 11)
    logits = loaded(ids).logits
    assert logits.dtype == dtype
    reference = model(ids).logits[..., :-1]
    # Half precision keeps the prediction: the same argmax on almost every position, close logits.
    assert (logits[..., :-1].float().argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    assert (logits[..., :-1].float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_shipped_model_loads_in_bfloat16_and_with_a_device_map():
    folder = pretrained_path(DEFAULT_MDM)
    reference = AutoModel.from_pretrained(folder, dtype=torch.float32)
    ids = random_ids(2, 32, vocab=reference.config.mask_token_id)
    bf16 = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    agreement = (bf16(ids).logits.float().argmax(-1) == reference(ids).logits.argmax(-1)).float().mean()
    assert agreement > 0.9
    mapped = AutoModel.from_pretrained(folder, device_map="auto")  # CPU only here: everything lands on the CPU
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in mapped.parameters()} == {expected_device}
    torch.testing.assert_close(mapped(ids.to(mapped.device)).logits.cpu().float(),
                               AutoModel.from_pretrained(folder)(ids).logits.float(), rtol=0, atol=0)


REMOTE_SCRIPT = textwrap.dedent(
    """
    try:
        import hf_mdm
        sys.exit("hf_mdm could be imported")
    except ImportError:
        pass
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM
    folder, ids_file, out_file = sys.argv[1:4]
    ids = torch.load(ids_file)
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        model = auto_class.from_pretrained(folder, trust_remote_code=True)
        assert not type(model).__module__.startswith("hf_mdm"), type(model).__module__
        assert type(model).__name__ == "MDMForMaskedDiffusion"
    assert "hf_mdm" not in sys.modules
    output = model(ids, labels=ids, output_hidden_states=True)
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1
    torch.save(output.logits, out_file)
    """
)


def test_remote_code_loads_without_hf_mdm(tmp_path, model):
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    ids = random_ids(2, 9)
    torch.save(ids, tmp_path / "ids.pt")
    run_without_hf_mdm(REMOTE_SCRIPT, [folder, tmp_path / "ids.pt", tmp_path / "out.pt"], tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.tensor([1, 2, 3])), "shape"),
        (lambda m: m(torch.tensor([[1, 2, 51]])), "vocab_size"),
        (lambda m: m(torch.tensor([[-1, 2, 3]])), "vocab_size"),
        (lambda m: m.generate(torch.ones(1, 1, dtype=torch.long), max_new_tokens=64), "max_position_embeddings"),
        (lambda m: m(torch.ones(1, 5)), "dtype"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4)), "attention_mask"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), output_positions=torch.tensor([[5]])), "output_positions"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), output_positions=torch.tensor([[-1]])), "output_positions"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), output_positions=torch.tensor([3])), "output_positions"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), output_positions=torch.tensor([[1], [2]])), "batch size"),
        (lambda m: m(inputs_embeds=torch.ones(1, 5, 7)), "inputs_embeds"),
    ],
)
def test_bad_input_raises_value_error(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


def test_gpu_forward_matches_cpu(model):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (CI is CPU-only); run on a GPU machine to cover this path")
    ids = random_ids(2, 16)
    expected = model(ids).logits
    gpu = tiny_model().cuda()
    torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), expected, rtol=1e-4, atol=1e-4)
    for dtype in (torch.bfloat16, torch.float16):
        logits = gpu.to(dtype)(ids.cuda()).logits[..., :-1].float().cpu()
        assert (logits.argmax(-1) == expected[..., :-1].argmax(-1)).float().mean() > 0.9
