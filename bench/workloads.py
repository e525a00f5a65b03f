"""Data shaped like users' data, for the workload suite (bench/gpu_workloads.sh) and the GPU smoke test.

    python bench/workloads.py OUT_DIR        writes OUT_DIR/{mixed.jsonl, chat.jsonl, long.jsonl}

- mixed: the guide's section 5 recipe. A stand-in for `alpaca-gpt4-data-zh#500` + `alpaca-gpt4-data-en#500`
  (alpaca records: instructions of ~20 words, answers log-normal around ~150 words with a tail past 1,000),
  the 8 identity records of examples/self_cognition.json added by the command line.
- chat: multi-turn sharegpt conversations of 2k-16k tokens.
- long: a few single-turn samples of 32k-64k tokens.
- pairs: preference pairs for `rlhf --rlhf_type dpo` (TRL's conversational form): the mixed workload's prompts,
  chosen and rejected answers of ~100-600 tokens each.
Text is random words (English) or random common characters (Chinese): the token counts, not the
meaning, are what the speed depends on. Fixed seeds: every run trains on the same records.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

EN = ("the of and to in is that it for on with as was at by be this from or have an are not which but "
      "model data time people water world system answer question example result value first new way use "
      "make good know work life state long great small place number part case point group problem fact").split()
ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"


def words(n: int, rng: random.Random, zh: bool) -> str:
    if zh:
        return "".join(rng.choice(ZH) for _ in range(int(n * 1.6)))  # ~1.6 characters a word
    return " ".join(rng.choice(EN) for _ in range(n))


def lognormal_words(rng: random.Random, median: float, sigma: float, most: int) -> int:
    return max(3, min(most, int(math.exp(rng.gauss(math.log(median), sigma)))))


def mixed(n_per_language: int = 500, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for zh in (True, False):
        for _ in range(n_per_language):
            record = {"instruction": words(lognormal_words(rng, 20, 0.5, 120), rng, zh),
                      "input": words(lognormal_words(rng, 15, 0.8, 200), rng, zh) if rng.random() < 0.35 else "",
                      "output": words(lognormal_words(rng, 150, 0.7, 1400), rng, zh)}
            out.append(record)
    return out


def conversation(rng: random.Random, target_words: int) -> dict:
    turns, used = [], 0
    while used < target_words:
        q = lognormal_words(rng, 40, 0.6, 400)
        a = lognormal_words(rng, 350, 0.6, 3000)
        turns += [{"from": "human", "value": words(q, rng, False)}, {"from": "gpt", "value": words(a, rng, False)}]
        used += q + a
    return {"conversations": turns}


def chat(n: int = 48, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)  # ~1.3 tokens a word: 2k-16k tokens
    return [conversation(rng, rng.randint(1500, 12500)) for _ in range(n)]


def long(n: int = 4, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)  # 32k-64k tokens
    return [{"instruction": words(rng.randint(200, 2000), rng, False),
             "output": words(rng.randint(28000, 52000), rng, False)} for _ in range(n)]


def pairs(n: int = 400, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)  # answers of 75-450 words: ~100-600 tokens
    out = []
    for r in mixed(n // 2, seed):
        zh = not r["instruction"].isascii()
        prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        chosen, rejected = (words(lognormal_words(rng, 180, 0.5, 450) // (2 if zh else 1) + 40, rng, zh) for _ in "cr")
        out.append({"prompt": [{"role": "system", "content": "You are a helpful assistant."},
                               {"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("mixed", mixed()), ("chat", chat()), ("long", long()), ("pairs", pairs())):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{out / name}.jsonl: {len(records)} records")


if __name__ == "__main__":
    main()
