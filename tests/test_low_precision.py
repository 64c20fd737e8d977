"""The GPU path's dtype contract, checked on CPU: a base model loaded in bf16/fp16 (as a GPU
silo loads it) still yields an fp32 adapter — LoRA factors and the copied classifier head
alike — so the initial adapter, every delta and the aggregator's schema agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tests.conftest import ROOT
from tests.test_end_to_end import _minilm

from fedsilo.adapters import check_schema, delta, schema_of
from fedsilo.silo_agent.model import adapter_state, peft_config, wrap
from fedsilo.spec import load_job

MINILM = _minilm()  # the wheel's folder: `make test` needs no `make data`


def load(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3, dtype=dtype, local_files_only=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_trains_and_sends_an_fp32_adapter(dtype: torch.dtype) -> None:
    spec = load_job(ROOT / "examples" / "quickstart.yaml").spec
    config = peft_config(spec, str(MINILM))
    bare = get_peft_model(load(dtype), peft_config(spec, str(MINILM)))  # what peft alone does
    assert {str(v.dtype) for v in adapter_state(bare).values()} != {"torch.float32"}, "the test would not fail"

    model = wrap(load(dtype), config, seed=0)
    initial = adapter_state(model)
    assert {v.dtype for v in initial.values()} == {torch.float32}
    assert any("classifier" in k for k in initial)  # the head travels, in fp32 too

    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.autocast("cpu", dtype=dtype):  # as `hardware.autocast_forward` does on a GPU
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimiser.step()

    trained = adapter_state(model)
    update = delta(trained, initial)
    check_schema(update, schema_of(initial))  # the aggregator's check: no wrong_dtype
    assert any(t.abs().sum() > 0 for t in update.values())
    assert all(v.dtype == torch.float32 for v in trained.values())


def test_wrap_keeps_fp32_models_untouched(tmp_path: Path) -> None:
    spec = load_job(ROOT / "examples" / "quickstart.yaml").spec
    model = wrap(load(torch.float32), peft_config(spec, str(MINILM)), seed=0)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in frozen)


def test_gpu_check_says_no_gpu_and_passes_without_cuda() -> None:
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: run scripts/gpu-check.sh itself")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "gpu-check: no GPU (torch.cuda.is_available() is false): skipped"
