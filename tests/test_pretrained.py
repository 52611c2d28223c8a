"""The checkpoints shipped inside hf_mdm (src/hf_mdm/pretrained/): they load offline by name, their remote code is the
package's code, they stay small, they are trained (scored on held-out Shakespeare), the MDM samples exactly as
generate() promises, and the MDM folder loads with remote code where hf_mdm is not installed."""

import filecmp
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_mdm
from hf_mdm import MDMForMaskedDiffusion, MDMGenerationConfig
from hf_mdm.constants import DEFAULT_MDM, PRETRAINED, SHIPPED_JUDGE
from hf_mdm.pretrained import pretrained_path, resolve_checkpoint
from hf_mdm.training import validation_loss, validation_nelbo

from conftest import run_without_hf_mdm


REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(hf_mdm.__file__).resolve().parent
MAX_WEIGHT_BYTES = 25_000_000  # both are ~16.5 MB in float16; the package must stay small enough to pip install

# Henry V is in the TEST split of examples/shakespeare/prepare.py (neither trained on nor used to pick a checkpoint):
# two speeches from Act 3 Scene 1 and Act 4 Scene 3 of the public-domain text (small differences from the Gutenberg
# edition do not matter here). 2 blocks of 256 tokens are taken from it.
HENRY_V = """KING HENRY.
Once more unto the breach, dear friends, once more;
Or close the wall up with our English dead.
In peace there's nothing so becomes a man
As modest stillness and humility:
But when the blast of war blows in our ears,
Then imitate the action of the tiger;
Stiffen the sinews, summon up the blood,
Disguise fair nature with hard-favour'd rage;
Then lend the eye a terrible aspect;
Let it pry through the portage of the head
Like the brass cannon; let the brow o'erwhelm it
As fearfully as doth a galled rock
O'erhang and jutty his confounded base,
Swill'd with the wild and wasteful ocean.
Now set the teeth and stretch the nostril wide,
Hold hard the breath and bend up every spirit
To his full height. On, on, you noblest English,
Whose blood is fet from fathers of war-proof!
Fathers that, like so many Alexanders,
Have in these parts from morn till even fought
And sheathed their swords for lack of argument:
Dishonour not your mothers; now attest
That those whom you call'd fathers did beget you.
Be copy now to men of grosser blood,
And teach them how to war. And you, good yeoman,
Whose limbs were made in England, show us here
The mettle of your pasture; let us swear
That you are worth your breeding; which I doubt not;
For there is none of you so mean and base,
That hath not noble lustre in your eyes.
I see you stand like greyhounds in the slips,
Straining upon the start. The game's afoot:
Follow your spirit, and upon this charge
Cry 'God for Harry, England, and Saint George!'

[Exeunt. Alarum, and chambers go off.]

WESTMORELAND.
O that we now had here
But one ten thousand of those men in England
That do no work to-day!

KING HENRY.
What's he that wishes so?
My cousin Westmoreland? No, my fair cousin:
If we are mark'd to die, we are enow
To do our country loss; and if to live,
The fewer men, the greater share of honour.
God's will! I pray thee, wish not one man more.
By Jove, I am not covetous for gold,
Nor care I who doth feed upon my cost;
It yearns me not if men my garments wear;
Such outward things dwell not in my desires:
But if it be a sin to covet honour,
I am the most offending soul alive.
No, faith, my coz, wish not a man from England:
God's peace! I would not lose so great an honour
As one man more, methinks, would share from me
For the best hope I have. O, do not wish one more!
Rather proclaim it, Westmoreland, through my host,
That he which hath no stomach to this fight,
Let him depart; his passport shall be made
And crowns for convoy put into his purse:
We would not die in that man's company
That fears his fellowship to die with us.
"""


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Loading a shipped checkpoint must never need the Hub: a call that tried to reach it fails."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def mdm():
    return AutoModel.from_pretrained(resolve_checkpoint(DEFAULT_MDM)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_checkpoint(DEFAULT_MDM))


@pytest.fixture(scope="module")
def blocks(tokenizer):
    """2 blocks of 256 tokens of HENRY_V: (2, 256)."""
    ids = tokenizer(HENRY_V, add_special_tokens=False).input_ids
    assert len(ids) >= 512, len(ids)
    return torch.tensor(ids[:512]).view(2, 256)


def test_names_and_exports():
    assert set(hf_mdm.PRETRAINED) == {DEFAULT_MDM, SHIPPED_JUDGE, "shakespeare-bd3lm"}
    assert hf_mdm.pretrained_path is pretrained_path
    assert pretrained_path(DEFAULT_MDM) == PACKAGE / "pretrained" / DEFAULT_MDM
    assert resolve_checkpoint(SHIPPED_JUDGE) == str(PACKAGE / "pretrained" / SHIPPED_JUDGE)
    assert resolve_checkpoint("owner/some-model") == "owner/some-model"  # Hub ids and existing folders pass through
    assert resolve_checkpoint(str(PACKAGE / "pretrained")) == str(PACKAGE / "pretrained")
    with pytest.raises(ValueError, match="'runs/my-mdm/model' is not a folder, a shipped name"):
        resolve_checkpoint("runs/my-mdm/model")  # a path that exists nowhere (and cannot be a Hub id): refused here
    with pytest.raises(ValueError, match=r"one of \['shakespeare-ar', 'shakespeare-bd3lm', 'shakespeare-mdm'\], got 'nope'"):
        pretrained_path("nope")


def test_mdm_loads_by_name(mdm, tokenizer):
    assert type(mdm) is MDMForMaskedDiffusion
    assert {p.dtype for p in mdm.parameters()} == {torch.float32}  # stored in float16, loaded as the config says
    config = mdm.config
    assert config.time_conditioning is False and config.max_position_embeddings == 256
    assert len(tokenizer) == config.vocab_size == 4099
    assert tokenizer.convert_tokens_to_ids("[MASK]") == tokenizer.mask_token_id == config.mask_token_id
    assert tokenizer.eos_token_id == config.eos_token_id is not None
    assert tokenizer.pad_token_id == config.pad_token_id is not None
    assert len({config.mask_token_id, config.eos_token_id, config.pad_token_id}) == 3
    settings = mdm.generation_config
    assert isinstance(settings, MDMGenerationConfig)
    assert (settings.sampler, settings.sampling_dtype) == ("first_hitting", "float64")


def test_judge_loads_by_name(tokenizer):
    judge = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(SHIPPED_JUDGE))
    judge_tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(SHIPPED_JUDGE))
    assert {p.dtype for p in judge.parameters()} == {torch.float32}
    assert judge.config.n_positions == 256 and judge.config.vocab_size == len(tokenizer)
    assert judge_tokenizer.get_vocab() == tokenizer.get_vocab()  # the same tokenizer: samples need no re-encoding
    assert judge_tokenizer.eos_token_id == judge.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("name", [DEFAULT_MDM, "shakespeare-bd3lm"])
def test_the_shipped_folder_holds_no_copy_of_the_remote_code(name):
    """One copy of the remote code: the package's. A saved folder gets it from save_pretrained (or publish)."""
    assert not list(pretrained_path(name).glob("*.py"))


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_weights_are_small_float16(name):
    from safetensors import safe_open

    weights = pretrained_path(name) / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHT_BYTES
    with safe_open(weights, "pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}


def test_every_shipped_file_is_packaged():
    """pyproject.toml ships each checkpoint's folder with a "NAME/*" package-data pattern, which takes the files of
    the folder but nothing in a subfolder: so each name needs its pattern and each folder must be flat."""
    tomllib = pytest.importorskip("tomllib")

    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert sorted(package_data["hf_mdm.pretrained"]) == [f"{name}/*" for name in sorted(PRETRAINED)]
    for name in PRETRAINED:
        assert all(path.is_file() for path in pretrained_path(name).iterdir()), f"{name} has a subfolder"


def test_mdm_nelbo_and_judge_nll_on_held_out_text(mdm, blocks):
    """Uniform guessing over the 4099 tokens costs log(4099) = 8.32 nats per token. At the end of training the
    validation NELBO was 4.02 (MDM) and the validation NLL 3.85 (AR), on held-out works. The bounds below leave room
    for 2 blocks of one passage (estimator noise, a different play) but fail for wrong weights (a float16 round trip
    gone wrong, a mismatched tokenizer or [MASK] id), which score near or above the unigram level (~6 nats)."""
    nelbo = validation_nelbo(mdm, blocks, num_passes=8, seed=0)
    assert nelbo.estimate == "truncated_nelbo" and not nelbo.is_bound and nelbo.num_tokens == 512
    assert nelbo.nats_per_token < 5.5, nelbo
    judge = AutoModelForCausalLM.from_pretrained(pretrained_path(SHIPPED_JUDGE))
    nll = validation_loss(judge, blocks, objective="ar")
    assert nll.nats_per_token < 5.0, nll


def test_the_block_diffusion_model_is_trained_and_samples_with_its_exact_cache(blocks, tokenizer):
    """shakespeare-bd3lm: blocks of 4, its block NELBO on held-out text far below the unigram level (~6 nats; the
    card's figure over 128 test blocks is 4.10), and cached generation the same draws as uncached."""
    model = AutoModel.from_pretrained(pretrained_path("shakespeare-bd3lm"))
    assert model.config.diffusion_block_size == 4 and model.generation_config.use_cache
    assert validation_nelbo(model, blocks, num_passes=4, seed=0).nats_per_token < 5.5
    prompt = tokenizer("KING HENRY.\n", return_tensors="pt").input_ids
    settings = dict(max_new_tokens=24, stop_at_eos=False, return_dict_in_generate=True)
    cached = model.generate(prompt, generator=torch.Generator().manual_seed(0), **settings)
    uncached = model.generate(prompt, use_cache=False, generator=torch.Generator().manual_seed(0), **settings)
    assert torch.equal(cached.sequences, uncached.sequences) and (cached.nfe_per_sequence == 24).all()


def test_first_hitting_generate(mdm, tokenizer):
    """32 tokens after a prompt, 2 rows: exactly one network call per generated token, every [MASK] filled."""
    prompt = tokenizer(["KING HENRY.\nOnce more unto the breach"] * 2, return_tensors="pt",
                       add_special_tokens=False).input_ids
    out = mdm.generate(prompt, max_new_tokens=32, generator=torch.Generator().manual_seed(0),
                       return_dict_in_generate=True)
    assert out.sequences.shape == (2, prompt.shape[1] + 32)
    assert torch.equal(out.sequences[:, :prompt.shape[1]], prompt)
    assert not (out.sequences == mdm.config.mask_token_id).any()
    assert out.nfe == 32 and out.nfe_per_sequence.tolist() == [32, 32]


REMOTE_CODE_SCRIPT = """
import sys, torch
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)  # the config names remote code
out = model.generate(max_new_tokens=8, generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert out.sequences.shape == (1, 8) and out.nfe == 8 and not (out.sequences == model.config.mask_token_id).any()
print(type(model).__name__, tokenizer.decode(out.sequences[0]))
"""


def test_a_saved_folder_loads_without_hf_mdm(tmp_path, mdm, tokenizer):
    """save_pretrained writes the package's remote code (the modeling file and its relative imports) into the folder,
    and config.json names it: the folder then loads and samples where hf_mdm is not installed."""
    from hf_mdm.constants import travelling_files

    mdm.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    for name in travelling_files("mdm"):
        assert filecmp.cmp(tmp_path / "saved" / name, PACKAGE / name, shallow=False), name
    assert sorted(path.name for path in (tmp_path / "saved").glob("*.py")) == sorted(travelling_files("mdm"))
    result = run_without_hf_mdm(REMOTE_CODE_SCRIPT, [tmp_path / "saved"], tmp_path)
    assert result.stdout.startswith("MDMForMaskedDiffusion ")


def test_the_shipped_judge_scores_in_float32():
    """Its weights are stored in float16; a judge left in float16 scores imprecisely and, on a CPU, many times slower
    (the first reproduction run lost 20 minutes per part to it)."""
    from hf_mdm.evaluation import load_judge

    judge = load_judge(str(pretrained_path(SHIPPED_JUDGE)), "cpu")
    assert judge.model.dtype == torch.float32
