"""Batches: pad to the longest sequence of the batch (never to max_length)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from alignctl.data.encode import IGNORE_INDEX


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def collate_sequences(examples: Sequence, pad_token_id: int) -> Dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels (+ row_index) for a batch of unpacked examples."""
    ids = [e.input_ids for e in examples]
    return {
        "input_ids": pad_right(ids, pad_token_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "labels": pad_right([e.labels for e in examples], IGNORE_INDEX),
        "row_index": torch.tensor([e.row_index for e in examples]),
        "seq_lengths": torch.tensor([len(s) for s in ids]),
    }


def collate_packed(examples: Sequence, pad_token_id: int) -> Dict[str, torch.Tensor]:
    """Packed rows: no attention mask; position ids restart at each example's start.

    transformers derives a block-diagonal causal mask from position ids that restart at 0 when
    no attention mask is given. Padding at a row's end gets positions of its own segment.
    """
    batch = collate_sequences(examples, pad_token_id)
    del batch["attention_mask"]
    width = batch["input_ids"].shape[1]
    positions: List[List[int]] = []
    for e in examples:
        row: List[int] = []
        bounds = list(e.starts) + [len(e.input_ids)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            row.extend(range(end - start))
        row.extend(range(width - len(e.input_ids)))
        positions.append(row)
    batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
    return batch


def count_label_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss (labels shifted: the first position never does)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def example_length(example) -> int:
    """Longest row an example puts in a batch (for grouping examples of similar length)."""
    if hasattr(example, "input_ids"):  # SFT
        return len(example.input_ids)
    if hasattr(example, "chosen_ids"):  # a preference pair
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    return len(example.prompt_ids) + len(example.completion_ids)  # KTO
