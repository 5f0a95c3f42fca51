"""Supervised examples for arith-chain: prompt + solution token ids, loss on the solution only."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from e3rl.engine.model_factory import build_char_tokenizer

from .arith import ALPHABET, CHAT_TEMPLATE, ArithProblem, format_prompt

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)


def build_arith_tokenizer() -> PreTrainedTokenizerBase:
    """The bundled model's character-level tokenizer with the arith-chain chat template."""
    return build_char_tokenizer(ALPHABET, chat_template=CHAT_TEMPLATE, model_max_length=512)


def encode_example(tokenizer: PreTrainedTokenizerBase, question: str,
                   solution: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of ``prompt + solution + EOS``; labels mask the prompt out."""
    prompt_ids = tokenizer.encode(format_prompt(question), add_special_tokens=False)
    target_ids = tokenizer.encode(solution, add_special_tokens=False) + [tokenizer.eos_token_id]
    if tokenizer.unk_token_id in prompt_ids or tokenizer.unk_token_id in target_ids:
        raise ValueError(f"characters outside the tokenizer's alphabet in {question!r}")
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


def collate(tokenizer: PreTrainedTokenizerBase,
            problems: Iterable[ArithProblem]) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``, ``attention_mask``, ``labels``, each [B, T]."""
    encoded = [encode_example(tokenizer, p.question, p.solution) for p in problems]
    max_len = max(len(ids) for ids, _ in encoded)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), max_len), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(encoded), max_len), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(encoded), max_len), dtype=torch.long)  # [B, T]
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and correctness of the next-token prediction.

    logits [B, T, V], labels [B, T] (IGNORE_INDEX where no loss). Returns (nll [B, T-1],
    mask [B, T-1]) aligned so that position t predicts label t+1."""
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    mask = shift_labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")
    return nll * mask, mask
