"""Build small Hugging Face model directories offline: random weights from a config and a
character-level tokenizer made with `tokenizers`.

Used by the tests (tiny Llama / Qwen3 / Qwen2 / Mistral models), the benchmarks (a ~100M
Qwen3-shaped model) and the SFT trainer (the bundled model starts from here). Every model is
written as a normal directory (``config.json``, ``model.safetensors``, tokenizer files) and is
loaded back through the same path a user's model takes.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]
DEFAULT_ALPHABET = string.printable.replace("\x0b", "").replace("\x0c", "")

# A minimal chat template: one line per turn, the assistant's answer ends with EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

# Tiny configs for tests: 2 layers, hidden 64, GQA where the architecture has it.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, sliding_window=256),
}

# The throughput benchmark's model: Qwen3-shaped, ~100M parameters with a 32k vocabulary.
BENCH_QWEN3_100M = dict(model_type="qwen3", hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                        head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                        tie_word_embeddings=True)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET,
                         chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
                         model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per character of ``alphabet`` plus
    ``<unk> <s> </s> <pad>`` (ids 0-3). Built offline, saved like any HF tokenizer."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, bos_token=BOS,
                                  eos_token=EOS, pad_token=PAD,
                                  model_max_length=model_max_length)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_random_model(out_dir: str | Path, config: dict, *, seed: int = 0,
                       tokenizer: PreTrainedTokenizerFast | None = None,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write a model directory with random weights for ``config`` (a dict with ``model_type``
    and config fields) and a character-level tokenizer. Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_char_tokenizer()
    fields = copy.deepcopy(config)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", len(tok))
    if fields["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {fields['vocab_size']} < tokenizer size {len(tok)}")
    fields.setdefault("tie_word_embeddings", False)
    fields.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    hf_config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_tiny_model(out_dir: str | Path, arch: str = "qwen3", *, seed: int = 0,
                     **overrides) -> Path:
    """A test model of architecture ``arch`` (one of ``TINY_CONFIGS``) with random weights."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(TINY_CONFIGS)}")
    config = {**TINY_CONFIGS[arch], **overrides}
    return build_random_model(out_dir, config, seed=seed)
