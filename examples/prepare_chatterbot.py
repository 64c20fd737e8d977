"""Turn the chatterbot-corpus categories into per-silo instruction JSONL files.

Categories make natural silos (a help desk, a quiz club, a companion bot), so each silo's
data looks different. A few questions of every category are held out (with all their
answers) as a shared validation file for the evaluator silo. Run once:

    python examples/prepare_chatterbot.py          # writes examples/data/chatterbot/*.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
from pathlib import Path

import yaml

SILOS = {
    "helpdesk": ["tech_support", "computers", "coding"],
    "academy": ["trivia", "science", "history", "literature", "ai", "politics", "money", "movies", "sports", "food"],
    "companion": ["conversations", "emotion", "psychology", "greetings", "humor", "gossip", "health", "botprofile"],
}
DIALOGUES = {"conversations"}  # each line answers the previous one; elsewhere lines 2.. answer line 1


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")  # not imported: the package does work on import
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    return Path(spec.submodule_search_locations[0]) / "data" / "english"


def pairs_of(category: str, conversation: object) -> list[tuple[str, str]]:
    """(question, answer) pairs of one corpus conversation; malformed entries give none."""
    if not isinstance(conversation, list) or len(conversation) < 2:
        return []
    lines = [str(x).strip() for x in conversation if isinstance(x, str | int | float)]
    if category in DIALOGUES or len(lines) > 10:
        return list(itertools.pairwise(lines))
    return [(lines[0], answer) for answer in lines[1:]]


def load_category(category: str) -> list[list[tuple[str, str]]]:
    """Pairs grouped by question, so held-out questions take all their answers with them."""
    document = yaml.safe_load((corpus_dir() / f"{category}.yml").read_text())
    groups: dict[str, list[tuple[str, str]]] = {}
    for conversation in document.get("conversations", []):
        for question, answer in pairs_of(category, conversation):
            group = groups.setdefault(question, [])
            if question and answer and (question, answer) not in group:  # the corpus repeats some pairs
                group.append((question, answer))
    return [g for g in groups.values() if g]


def record(question: str, answer: str, category: str) -> dict[str, str]:
    return {"instruction": question, "input": "", "output": answer, "category": category}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data/chatterbot"))
    parser.add_argument("--holdout", type=float, default=0.06, help="Fraction of each category's questions held out.")
    parser.add_argument("--max-validation", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    validation: list[dict[str, str]] = []
    for silo, categories in SILOS.items():
        rows = []
        for category in categories:
            groups = load_category(category)
            rng.shuffle(groups)
            n_held = max(1, round(len(groups) * args.holdout)) if len(groups) > 3 else 0
            validation += [record(q, a, category) for group in groups[:n_held] for q, a in group]
            rows += [record(q, a, category) for group in groups[n_held:] for q, a in group]
        rng.shuffle(rows)
        write(args.out / f"{silo}.jsonl", rows)
    rng.shuffle(validation)
    write(args.out / "validation.jsonl", validation[:args.max_validation])


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
