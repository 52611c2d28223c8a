"""Files from elsewhere cost bounded memory and give one-line errors (issue 26, item 4): checkpoints whose few
bytes ask for gigabytes are refused before anything is materialised, `convert mdlm` checks shapes on the meta
device, index and tokenizer files that are not what they claim to be are named, and generate() refuses a call
that cannot fit before allocating it. Code-running payloads are in test_convert_mdlm.py and test_faults.py."""

import json
import pickle
import struct
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from hf_mdm.convert import ConversionError, UnsafeCheckpointError, convert_mdlm, safe_load
from hf_mdm.convert.pickled_tokenizer import read_pickled_tokenizer
from hf_mdm.convert.safe_load import torch_load_weights_only

from conftest import tiny_model
from llada_dream_reference import make_llada_checkpoint
from mdlm_reference import backbone_state, random_reference, save_hub_layout, save_lightning_checkpoint


def replace_pickle(path, data: bytes, compress=()):
    """Rewrites the torch.save archive `path` with `data` as its data.pkl (records named in `compress` deflated)."""
    with zipfile.ZipFile(path) as archive:
        records = {record.filename: archive.read(record) for record in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in records.items():
            if name.endswith("data.pkl") and data is not None:
                content = data
            method = zipfile.ZIP_DEFLATED if any(name.endswith(part) for part in compress) else zipfile.ZIP_STORED
            archive.writestr(name, content, compress_type=method)


def reduce_pickle(module: str, name: str, argument: int) -> bytes:
    """Protocol-2 pickle of `module.name(argument)`: what a 29-byte payload looks like."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"J" + struct.pack("<i", argument) + b"\x85R."


@pytest.mark.parametrize("module, name", [("builtins", "bytearray"), ("torch", "FloatTensor"),
                                          ("torch.storage", "UntypedStorage")])
def test_a_pickle_calling_an_allocating_constructor_is_refused(tmp_path, module, name):
    path = tmp_path / "payload.ckpt"
    torch.save({"x": torch.zeros(1)}, path)
    replace_pickle(path, reduce_pickle(module, name, 1 << 30))  # 1 GiB (4 GiB of floats) for 29 bytes
    with pytest.raises(UnsafeCheckpointError, match=rf"calls {module}\.{name}, which allocate"):
        torch_load_weights_only(path)


class _Storage:
    """Pickled as a persistent id: a storage of `numel` float32 numbers (record `key`)."""

    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False, OrderedDict())


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def torch_like_pickle(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    _TorchLikePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def test_a_storage_larger_than_the_file_is_refused(tmp_path):
    path = tmp_path / "big-storage.ckpt"
    torch.save({"x": torch.zeros(4)}, path)
    replace_pickle(path, torch_like_pickle({"x": _Tensor(_Storage("0", 1 << 29), (1 << 29,), (1,))}))
    with pytest.raises(UnsafeCheckpointError, match=r"asks for 2,147,483,648 bytes of storage, and the file holds"):
        torch_load_weights_only(path)


def test_an_archive_that_decompresses_past_the_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_load, "MEMORY_SLACK", 0)  # the rule without its 64 MiB allowance: a cheap test
    path = tmp_path / "bomb.ckpt"
    torch.save({"x": torch.zeros(1 << 20)}, path)  # 4 MiB of zeros ...
    replace_pickle(path, None, compress=("data/0",))  # ... deflated to a few KiB
    with pytest.raises(UnsafeCheckpointError, match=r"archive expands to 4,\d{3},\d{3} bytes"):
        torch_load_weights_only(path)
    torch.save({"x": torch.zeros(1 << 20)}, path)
    assert torch_load_weights_only(path)["x"].shape == (1 << 20,)  # stored records are what torch.save writes


def test_zero_stride_tensors_are_refused_before_they_are_copied(tmp_path):
    reference = random_reference(seed=3, vocab_size=53)
    path = save_lightning_checkpoint(reference, tmp_path / "run.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"]["backbone.blocks.0.norm1.weight"] = torch.zeros(1).expand(1 << 30)  # 4 GiB once copied
    torch.save(checkpoint, path)
    assert path.stat().st_size < 10 << 20
    with pytest.raises(UnsafeCheckpointError, match=r"shape \(1073741824,\) and strides \(0,\) views 4 stored bytes"):
        convert_mdlm(path, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_shared_references_cannot_explode_the_hyper_parameters(tmp_path):
    reference = random_reference(seed=4, vocab_size=53)
    path = save_lightning_checkpoint(reference, tmp_path / "run.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    node = ["leaf"]
    for _ in range(40):  # 2**40 leaves, a few hundred bytes of pickle
        node = [node, node]
    checkpoint["hyper_parameters"] = {"config": {"model": node}}
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match=r"run\.ckpt: hyper_parameters: copying it reaches more than 1,000,000"):
        convert_mdlm(path, tmp_path / "dst")


def test_convert_mdlm_checks_shapes_on_the_meta_device(tmp_path, monkeypatch):
    from hf_mdm.convert import mdlm

    source = save_hub_layout(random_reference(seed=5, vocab_size=53), tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    built_on = []
    original_init = mdlm.MDMForMaskedDiffusion.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(torch.empty(0).device.type)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(mdlm.MDMForMaskedDiffusion, "__init__", recording_init)
    for change, message in (({"hidden_dim": 8192}, r"shape mismatch for backbone\.vocab_embed\.embedding.*\(53, 8192\)"),
                            ({"n_blocks": 48}, r"missing weight backbone\.blocks\.2\.norm1\.weight")):
        (source / "config.json").write_text(json.dumps({**config, **change}))
        built_on.clear()
        with pytest.raises(ConversionError, match=message):
            convert_mdlm(source, tmp_path / "dst")
        assert built_on == ["meta"]  # refused before a model that would need gigabytes was built


def test_an_index_with_non_string_shards_is_named(tmp_path):
    source = save_hub_layout(random_reference(seed=6, vocab_size=53), tmp_path / "src")
    (source / "model.safetensors").rename(source / "model-00001-of-00001.safetensors")
    weight_map = {"backbone.vocab_embed.embedding": 7}
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match=r"weight_map\['backbone\.vocab_embed\.embedding'\] must be the file name "
                                              r"of a shard in the same folder .* got 7"):
        convert_mdlm(source, tmp_path / "dst")
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(ConversionError, match=r"got '\.\./\.\./etc/passwd'"):
        convert_mdlm(source, tmp_path / "dst")

    from hf_mdm.convert import convert_llama_family

    folder = tmp_path / "llada"
    make_llada_checkpoint(folder, num_shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = ["a list"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"weight_map\['[\w.]+'\] must be the file name .* got \['a list'\]"):
        convert_llama_family("llada", folder, tmp_path / "llada-dst")


def test_a_deeply_nested_pickled_tokenizer_json_is_a_problem_not_a_crash():
    stand_in = safe_load._stand_in("transformers.GPT2TokenizerFast")()
    backend = safe_load._stand_in("tokenizers.Tokenizer")()
    backend.state = "[" * 200_000 + "]" * 200_000
    stand_in.state = {"_mask_token": "[MASK]", "_tokenizer": backend}
    ids = read_pickled_tokenizer(stand_in)
    assert not ids.readable
    assert "its pickled tokenizer.json nests deeper than Python's recursion limit" in ids.problems


def test_generate_refuses_a_call_that_cannot_fit_before_allocating_it():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"generate\(\) needs at least [\d,.]+ GiB for 10,000,000 rows x 40 positions "
                                         r".* generate at most about [\d,]+ rows per call"):
        model.generate(num_return_sequences=10_000_000, max_new_tokens=40)
    assert model.generate(num_return_sequences=2, max_new_tokens=8).shape == (2, 8)
