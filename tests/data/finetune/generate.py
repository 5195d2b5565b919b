"""Writes the finetuning test records in this folder (self-written templates, seeded).

    python tests/data/finetune/generate.py

instructions.jsonl: instruction / input / output records (arithmetic, word reversal,
capitals of made-up countries, plurals, sorting, counting); chat.jsonl: the same tasks as
user / assistant turns, some with a system message; classification.jsonl: short
made-up reviews labelled "good" or "bad".
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = (
    "apple river stone cloud lantern meadow copper violet harbor pepper candle forest "
    "window marble thunder saddle garden puzzle rocket velvet"
).split()
COUNTRIES = (
    "Zembla Orvania Quillia Brastor Kelmar Tundria Vashti Porlock Ellaria Drunmore Salvik "
    "Merenth Ostrava Caldun Ybris Fenmark Halvoy Istrel Jorvath Lunesse"
).split()
CAPITALS = (
    "Port Elm|Varn|Quilltown|Bras|Kelm City|Frost Hollow|Vashtopol|Lockhaven|Ellar|Drun|"
    "Salvikborg|Merenth Gate|Ostrov|Calda|Ybrisport|Fenholm|Halvik|Istra|Jorvik|Lunara"
).split("|")


def instruction_records(rng: random.Random, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(
                {
                    "instruction": "Add the two numbers.",
                    "input": f"{a} and {b}",
                    "output": f"{a} + {b} = {a + b}.",
                }
            )
        elif kind == 1:
            w = rng.choice(WORDS)
            out.append({"instruction": "Write the word backwards.", "input": w, "output": w[::-1]})
        elif kind == 2:
            i = rng.randrange(len(COUNTRIES))
            out.append(
                {
                    "instruction": f"What is the capital of {COUNTRIES[i]}?",
                    "input": "",
                    "output": f"The capital of {COUNTRIES[i]} is {CAPITALS[i]}.",
                }
            )
        elif kind == 3:
            w = rng.choice(WORDS)
            out.append(
                {
                    "instruction": "Give the plural of the noun.",
                    "input": w,
                    "output": f"The plural of {w} is {w}s.",
                }
            )
        elif kind == 4:
            ws = rng.sample(WORDS, 3)
            out.append(
                {
                    "instruction": "Sort these words alphabetically.",
                    "input": ", ".join(ws),
                    "output": ", ".join(sorted(ws)),
                }
            )
        else:
            w = rng.choice(WORDS)
            out.append(
                {
                    "instruction": f"How many letters are in the word '{w}'?",
                    "input": "",
                    "output": f"'{w}' has {len(w)} letters.",
                }
            )
    return out


def chat_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for r in instruction_records(rng, n):
        user = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "You are a brief, helpful assistant."})
        out.append({"messages": msgs})
    return out


GOOD = "wonderful great lovely delightful excellent superb charming brilliant".split()
BAD = "awful dreadful boring terrible dull broken disappointing miserable".split()
THINGS = "film book meal hotel concert game chair phone trip class".split()


def classification_records(rng: random.Random, n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        good = i % 2 == 0
        adj = rng.choice(GOOD if good else BAD)
        thing = rng.choice(THINGS)
        tail = rng.choice(
            ["", " I would go again.", " Never again.", " Ten out of ten.", " Not sure why."]
        )
        if not good and tail == " Ten out of ten.":
            tail = ""
        out.append({"text": f"The {thing} was {adj}.{tail}", "label": "good" if good else "bad"})
    rng.shuffle(out)
    return out


def write(name: str, records: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    write("instructions.jsonl", instruction_records(random.Random(1), 300))
    write("chat.jsonl", chat_records(random.Random(2), 300))
    write("classification.jsonl", classification_records(random.Random(3), 200))
