"""Mixtures of experts in the Llama family (the layer LLaDA-MoE, LLaDA 2.x and RND1 share): the router's two rules,
shared experts, dense first layers, partial rotary embeddings and transformers' expert kernels.

The oracles are transformers' own causal MoE models: with blocks of one token and unshifted logits, a block-causal
hf_mdm model attends exactly as a causal LM does, so its logits must equal theirs. Qwen3-MoE has the softmax rule
of LLaDA-MoE and RND1 (with and without renormalised top-k), GLM-4-MoE the sigmoid, group-limited, biased and scaled
rule of LLaDA 2.x (DeepSeek-V3's), with shared experts, a dense first layer, QK-norm and half-rotary heads."""

import pytest
import torch
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_mdm import MDMLlamaConfig, MDMLlamaForMaskedDiffusion

from conftest import assert_float32_close

SIZES = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24)


def randomized(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and "inv_freq" not in name:
                noise = torch.randn(tensor.shape, generator=generator) * 0.2
                tensor.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def qwen3_moe_pair(norm_topk_prob: bool):
    oracle = randomized(Qwen3MoeForCausalLM(Qwen3MoeConfig(**SIZES, **MOE, norm_topk_prob=norm_topk_prob,
                                                           rope_theta=10000.0, tie_word_embeddings=False)), seed=0)
    ours = MDMLlamaForMaskedDiffusion(MDMLlamaConfig(
        **SIZES, **MOE, norm_topk_prob=norm_topk_prob, qk_norm=True, diffusion_block_size=1, mask_token_id=63,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    ours.load_state_dict(oracle.state_dict())
    return oracle, ours.eval()


def glm4_moe_pair():
    fields = dict(SIZES, **MOE, n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                  routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True)
    oracle = randomized(Glm4MoeForCausalLM(Glm4MoeConfig(**fields, partial_rotary_factor=0.5, rope_theta=10000.0,
                                                         tie_word_embeddings=False)), seed=1)
    ours = MDMLlamaForMaskedDiffusion(MDMLlamaConfig(
        **SIZES, **MOE, num_shared_experts=1, first_k_dense_replace=1, router_score_function="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2, router_expert_bias=True,
        qk_norm=True, attention_bias=True, partial_rotary_factor=0.5, diffusion_block_size=1, mask_token_id=63,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    weights = {name.replace("gate.e_score_correction_bias", "gate.expert_bias"): tensor
               for name, tensor in oracle.state_dict().items()}
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return oracle, ours.eval()


PAIRS = {
    "qwen3_moe softmax, renormalised": lambda: qwen3_moe_pair(True),
    "qwen3_moe softmax, raw top-k (LLaDA-MoE)": lambda: qwen3_moe_pair(False),
    "glm4_moe sigmoid, grouped, biased, shared, half-rotary (LLaDA 2.x)": glm4_moe_pair,
}


@pytest.mark.parametrize("pair", PAIRS)
def test_with_blocks_of_one_token_the_moe_model_is_the_causal_moe_model(pair):
    oracle, ours = PAIRS[pair]()
    ids = torch.randint(0, 63, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded; the oracle is given the positions hf_mdm counts
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    keep = torch.arange(64) != 63
    with torch.no_grad():
        expected = oracle(ids, attention_mask=mask, position_ids=positions, output_router_logits=True)
        actual = ours(ids, attention_mask=mask, output_router_logits=True)
        routed = ours.model(ids, attention_mask=mask, output_router_logits=True).router_logits
    assert_float32_close(actual.logits[0, :, keep], expected.logits[0, :, keep])
    assert_float32_close(actual.logits[1, 4:, keep], expected.logits[1, 4:, keep])
    # The same routing: the same router logits in every MoE layer at every real token (padding rows are nobody's).
    expected_routers = [logits for logits in expected.router_logits if logits is not None]
    assert len(routed) == len(expected_routers) == (2 if "glm4" in pair else 3)
    real = mask.flatten().bool()
    for ours_layer, theirs_layer in zip(routed, expected_routers):
        assert_float32_close(ours_layer[real].float(), theirs_layer[real].float())


def test_the_model_without_blocks_is_bidirectional_and_differs():
    """The same weights without a block size: later tokens now change earlier logits (the comparison can fail)."""
    oracle, ours = qwen3_moe_pair(True)
    ours.config.diffusion_block_size = None
    ids = torch.randint(0, 63, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - oracle(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_transformers_expert_kernels_give_the_plain_paths_logits(implementation):
    _, ours = glm4_moe_pair()
    ids = torch.randint(0, 63, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours.set_experts_implementation("eager")
        plain = ours(ids).logits
        ours.set_experts_implementation(implementation)
        assert ours.model.layers[1].mlp.experts.config._experts_implementation == implementation
        assert_float32_close(ours(ids).logits, plain)


def test_group_limited_routing_chooses_only_from_the_best_groups():
    """4 groups of 2 experts, the best 2 groups kept: experts of the other groups are never chosen, even when their
    own score is high (expert 7 alone scores highest, but its group's two best sum lower)."""
    config = MDMLlamaConfig(**SIZES, **MOE, router_score_function="sigmoid", n_group=4, topk_group=2,
                            mask_token_id=63)
    from hf_mdm.modeling_mdm_llama import MDMRouter

    router = MDMRouter(config)
    logits = torch.tensor([[1.0, 1.0, 0.9, 0.9, -5.0, -5.0, -5.0, 3.0]])
    with torch.no_grad():
        router.weight.copy_(torch.eye(8, 64))
        _, weights, chosen = router(torch.nn.functional.pad(logits, (0, 56)))
    assert sorted(chosen[0].tolist()) == [0, 1]
    assert torch.allclose(weights, torch.sigmoid(torch.tensor([1.0, 1.0])))


@pytest.mark.parametrize("field, value, message", [
    ("num_experts_per_tok", 9, r"num_experts_per_tok \(9\) must be at most num_experts \(8\)"),
    ("router_score_function", "relu", r"router_score_function must be one of \('softmax', 'sigmoid'\), got 'relu'"),
    ("n_group", 3, "n_group and topk_group go together"),
    ("moe_intermediate_size", None, "moe_intermediate_size must be a positive integer, got None"),
    ("partial_rotary_factor", 0.2, r"rope_parameters\['partial_rotary_factor'\] must be a number in \(0, 1\] that turns"),
])
def test_bad_expert_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=rf"MDMLlamaConfig\.{message}"):
        MDMLlamaConfig(**{**SIZES, **MOE, field: value})


def switch_load_balancing_loss(router_logits, num_experts, top_k, real):
    """Switch Transformer's loss over all MoE layers at the real tokens: E * sum_e f_e * P_e, f_e the share of
    (token, slot) choices of expert e, P_e its mean router probability."""
    probs = torch.cat([logits[real].softmax(-1) for logits in router_logits])
    chosen = probs.topk(top_k, dim=-1).indices
    share = torch.zeros(num_experts).index_add_(0, chosen.flatten(), torch.ones(chosen.numel())) / probs.shape[0]
    return num_experts * (share * probs.mean(0)).sum()


def test_the_load_balancing_loss_is_switch_transformers_and_joins_the_loss_with_its_weight():
    model = MDMLlamaForMaskedDiffusion(MDMLlamaConfig(**SIZES, **MOE, router_aux_loss_coef=0.25, mask_token_id=63))
    model = randomized(model, seed=5)
    ids = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    noisy = ids.clone()
    noisy[:, ::3] = 63
    with torch.no_grad():
        out = model(noisy, attention_mask=mask, labels=ids, output_router_logits=True)
        plain = model(noisy, attention_mask=mask, labels=ids)
    assert plain.aux_loss is None and len(out.router_logits) == 3
    expected = switch_load_balancing_loss(out.router_logits, 8, 2, mask.flatten().bool())
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss > 1.0  # Switch's loss is 1 at perfect balance and above it otherwise
    torch.testing.assert_close(out.loss, plain.loss + 0.25 * expected)


@pytest.mark.parametrize("objective_name, block_size", [("mdm", None), ("mdm", 4), ("sft", None)])
def test_training_adds_the_weighted_load_balancing_loss_and_validation_does_not(objective_name, block_size):
    """Pretraining (bidirectional and block diffusion) and SFT alike."""
    from hf_mdm.training.objectives import get_objective

    model = randomized(MDMLlamaForMaskedDiffusion(MDMLlamaConfig(**SIZES, **MOE, router_aux_loss_coef=0.5,
                                                                 mask_token_id=63, diffusion_block_size=block_size)),
                       seed=7)
    objective = get_objective(objective_name, model.config)
    ids = torch.randint(0, 63, (4, 16), generator=torch.Generator().manual_seed(8))
    noise = objective.draw_noise(torch.Generator().manual_seed(9), 4, 16)
    extras = {"prompt_lengths": torch.tensor([3, 5, 4, 6])} if objective_name == "sft" else {}
    with torch.no_grad():
        bound = objective.training_loss(model.eval(), ids, noise, **extras)
        assert not objective.auxiliary_losses
        assert torch.allclose(bound, objective.sequence_losses(model, ids, noise, **extras).mean())
        trained = objective.training_loss(model.train(), ids, noise, **extras)
    (auxiliary,) = objective.auxiliary_losses
    assert auxiliary > 0.5  # 0.5 times a Switch loss of at least 1
    torch.testing.assert_close(trained, bound + auxiliary)


def test_experts_are_saved_one_by_one_and_stacked_when_loaded(tmp_path):
    """The Hub layout of LLaDA-MoE, LLaDA 2.x and RND1 (one tensor per expert projection) is what a saved folder holds
    and what loads: transformers' MoE conversion rule, registered for the family."""
    from safetensors import safe_open

    _, model = glm4_moe_pair()
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert {"model.layers.1.mlp.experts.7.gate_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight",
            "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.shared_experts.up_proj.weight"} <= names
    assert not any(name.endswith("experts.gate_up_proj") for name in names)
    loaded = MDMLlamaForMaskedDiffusion.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, 63, (2, 10), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


REMOTE_SCRIPT = """
import torch
from transformers import AutoModel
folder, ids_file, out_file = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
assert type(model).__name__ == "MDMLlamaForMaskedDiffusion" and "hf_mdm" not in sys.modules
torch.save(model(torch.load(ids_file)).logits, out_file)
"""


def test_a_saved_moe_folder_loads_without_hf_mdm(tmp_path):
    from conftest import run_without_hf_mdm

    _, model = glm4_moe_pair()
    model.save_pretrained(tmp_path / "saved")
    ids = torch.randint(0, 63, (2, 10), generator=torch.Generator().manual_seed(11))
    torch.save(ids, tmp_path / "ids.pt")
    run_without_hf_mdm(REMOTE_SCRIPT, [tmp_path / "saved", tmp_path / "ids.pt", tmp_path / "out.pt"], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(ids).logits, rtol=0, atol=0)
