"""Incremental detokenization: turn appended token ids into text without re-decoding the
whole output each step (the prefix/read offset scheme used by HF's TextStreamer and vLLM)."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Keeps the decoded text of one sequence's output tokens."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def update(self, output_ids: list[int]) -> str:
        """Decode what the last appended token adds; returns the new text."""
        prefix_text = self._decode(output_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(output_ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            new_text = full_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(output_ids)
            self.text += new_text
            return new_text
        return ""

    def reset(self, output_ids: list[int]) -> None:
        """Re-decode from scratch (after a truncation)."""
        self.text = self._decode(output_ids)
        self._prefix_offset = max(0, len(output_ids) - 5)
        self._read_offset = len(output_ids)
