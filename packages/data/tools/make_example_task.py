"""Rebuilds src/moe_data/tasks/kjv_verse_completion.jsonl (not run by tests).

    uv run --frozen python packages/data/tools/make_example_task.py

A four-way verse-completion task on the test split of the built-in corpus (text no model trained
on the default corpus has seen): the context is a verse's number and first half, the right
choice its second half, the wrong choices second halves of other test verses.
"""

import json
import re

import moe_data
import numpy as np

N_EXAMPLES = 120
N_CHOICES = 4
SEED = 7


def main() -> None:
    corpus = moe_data.default_corpus(cache_dir=False)
    verses = []
    for line in corpus.decode(corpus.test).split("\n")[1:]:  # the first line is a verse's tail
        m = re.fullmatch(r"(\d+) (.+)", line)
        if m and len(m.group(2).split()) >= 12:
            words = m.group(2).split()
            half = len(words) // 2
            verses.append((f"{m.group(1)} {' '.join(words[:half])}", " " + " ".join(words[half:])))
    rng = np.random.default_rng(SEED)
    chosen = rng.choice(len(verses), size=N_EXAMPLES, replace=False)
    header = {
        "name": "kjv-verse-completion",
        "description": "Pick the true second half of a King James verse from the built-in corpus's test split.",
        "template": "{context}",
        "separator": "\n",
    }
    out = moe_data.tasks.example_task_path()
    with open(out, "w") as f:
        f.write(json.dumps(header) + "\n")
        for i in chosen:
            context, ending = verses[i]
            others = [j for j in rng.permutation(len(verses)) if j != i][: N_CHOICES - 1]
            choices = [ending] + [verses[j][1] for j in others]
            order = rng.permutation(N_CHOICES)
            example = {
                "context": context,
                "choices": [choices[k] for k in order],
                "label": int(np.flatnonzero(order == 0)[0]),
            }
            f.write(json.dumps(example) + "\n")
    print(f"{out}: {N_EXAMPLES} examples from {len(verses)} verses")


if __name__ == "__main__":
    main()
