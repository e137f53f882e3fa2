"""Build tinystories_nextword.json: TinyStories validation stories cut before a word, the true
next word among four choices (three distractors that also follow the same word elsewhere in
the stories, so a model must read the story, not only the last word).

    python minlm/eval_tasks/tinystories_nextword/make_items.py ../shared/data/tinystories/valid.txt

Deterministic (seeded); the shipped file was built from the first stories of valid.txt, which
no shipped model trained on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections import Counter
from pathlib import Path

OUT = Path(__file__).with_name("tinystories_nextword.json")


def items(stories: list[str], n: int = 200, seed: int = 0) -> list[dict]:
    """``n`` items ``{"context", "choices", "label"}`` from ``stories`` (one per story, in
    order). The cut comes after at least eight words, before a lowercase word of three or more
    letters; distractors are the commonest other words after the same previous word in all
    ``stories`` (never the answer)."""
    rng = random.Random(seed)
    follows: dict[str, Counter] = {}
    for s in stories:
        ws = s.split()
        for a, b in itertools.pairwise(ws):
            if b.isalpha() and b.islower() and len(b) >= 3:
                follows.setdefault(a, Counter())[b] += 1
    out = []
    for story in stories:
        words = story.split(" ")
        spots = [i for i in range(8, min(len(words), 60))
                 if words[i].isalpha() and words[i].islower() and len(words[i]) >= 3
                 and "\n" not in " ".join(words[:i])]
        if not spots:
            continue
        i = rng.choice(spots)
        answer = words[i]
        common = [w for w, _ in follows.get(words[i - 1], Counter()).most_common(12)
                  if w != answer]
        if len(common) < 3:
            continue
        choices = rng.sample(common, 3) + [answer]
        rng.shuffle(choices)
        out.append({"context": " ".join(words[:i]), "choices": choices,
                    "label": choices.index(answer)})
        if len(out) == n:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("valid", help="TinyStories valid.txt (stories end at <|endoftext|> lines)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--pool-stories", type=int, default=2000,
                   help="stories whose common words are the distractors")
    args = p.parse_args()
    from minlm.data import read_documents

    stories = []
    for doc in read_documents(args.valid):
        stories.append(doc.strip())
        if len(stories) == args.pool_stories:
            break
    made = items(stories, args.n)
    OUT.write_text(json.dumps(made, indent=0, ensure_ascii=False) + "\n")
    print(f"wrote {len(made)} items to {OUT}")


if __name__ == "__main__":
    main()
