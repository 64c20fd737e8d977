"""A tiny random LlamaForCausalLM with a real byte-level BPE tokenizer and a ChatML template.

Built in a second from nothing, so causal-LM tests need no downloaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PAIRS = [
    ("What is a computer?", "A machine that follows instructions."),
    ("What is the capital of France?", "Paris."),
    ("Tell me a joke.", "Why did the robot cross the road? It was programmed to."),
    ("How do I reset my password?", "Use the reset link on the sign-in page."),
    ("What is two plus two?", "Four."),
    ("Who wrote Hamlet?", "William Shakespeare."),
    ("What colour is the sky?", "Blue, on a clear day."),
    ("How are you?", "I am well, thank you."),
]


def build_tokenizer(chat_template: str | None = CHATML):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained on PAIRS, with ChatML specials (pad = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"{q} {a} user assistant system Instruction Response ###" for q, a in PAIRS]
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


def build_model_folder(folder: Path) -> Path:
    """Save a 2-layer, hidden-64 LlamaForCausalLM and its tokenizer into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, repeat: int = 3) -> Path:
    rows = [{"instruction": q, "input": "", "output": a} for q, a in PAIRS] * repeat
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
