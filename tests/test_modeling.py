import json
import os
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

from hf_mdm import MDMForMaskedDiffusion

from conftest import run_without_hf_mdm, tiny_model


def random_ids(batch, seq_len, vocab=50, seed=0):
    return torch.randint(1, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_mask_logit(model):
    ids = random_ids(3, 12)
    ids[:, ::3] = model.config.mask_token_id
    logits = model(ids).logits
    assert logits.shape == (3, 12, model.config.vocab_size)
    assert torch.isneginf(logits[..., model.config.mask_token_id]).all()
    assert torch.isfinite(logits[..., : model.config.mask_token_id]).all()


def test_output_positions_match_full_logits(model):
    ids = random_ids(2, 16)
    full = model(ids).logits
    positions = torch.tensor([[0, 5, 15], [7, 7, 2]])
    partial = model(ids, output_positions=positions).logits
    assert partial.shape == (2, 3, model.config.vocab_size)
    expected = torch.stack([full[b, positions[b]] for b in range(2)])
    torch.testing.assert_close(partial, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_row_matches_the_sequence_alone(side, attn):
    model = tiny_model(attn_implementation=attn)
    model.config._attn_implementation = attn
    alone = random_ids(1, 9, seed=1)
    other = random_ids(1, 14, seed=2)
    pad = torch.zeros(1, 5, dtype=torch.long)
    row = torch.cat([pad, alone], 1) if side == "left" else torch.cat([alone, pad], 1)
    row_mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], 1) if side == "left" else torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], 1)
    batch = torch.cat([row, other])
    mask = torch.cat([row_mask, torch.ones(1, 14)]).long()
    batched = model(batch, attention_mask=mask).logits
    real = batched[0, 5:] if side == "left" else batched[0, :9]
    torch.testing.assert_close(real, model(alone).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1], model(other).logits[0], rtol=0, atol=1e-5)


def test_sdpa_and_eager_agree():
    sdpa, eager = tiny_model(), tiny_model()
    eager.config._attn_implementation = "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(sdpa(ids, **kwargs).logits, eager(ids, **kwargs).logits, rtol=0, atol=1e-5)


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


def test_save_load_and_auto_classes(tmp_path, model):
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_mdm.py", "modeling_mdm.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    ids = random_ids(2, 11)
    expected = model(ids).logits
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        loaded = auto_class.from_pretrained(tmp_path)
        assert type(loaded) is MDMForMaskedDiffusion
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


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
    torch.save(model(ids).logits, out_file)
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
        (lambda m: m(torch.ones(1, 65, dtype=torch.long)), "max_position_embeddings"),
        (lambda m: m(torch.ones(1, 5)), "dtype"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4)), "attention_mask"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), output_positions=torch.tensor([[5]])), "output_positions"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), output_positions=torch.tensor([3])), "output_positions"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), output_positions=torch.tensor([[1], [2]])), "batch size"),
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
