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


def unpad_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A right-padded batch -> its padding-free form: every row's real tokens end to end in one row.

    ``input_ids``/``labels`` become ``[1, N]`` (N real tokens, no padding), ``position_ids`` restart
    at 0 for each sequence, ``cu_seq_lens`` ``[rows + 1]`` holds the boundaries and the attention
    mask goes (attention is confined to each sequence by the kernel, alignctl.models.varlen). The
    other columns (row_index, seq_lengths, margin, ref_logps, ...) keep their per-row meaning.
    """
    lengths = batch["seq_lengths"]
    keep = batch["attention_mask"].bool()
    if not torch.equal(keep.sum(-1), lengths):
        raise ValueError("unpad_batch needs a right-padded batch whose attention_mask matches seq_lengths")
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    out["input_ids"] = batch["input_ids"][keep].unsqueeze(0)
    out["labels"] = batch["labels"][keep].unsqueeze(0)
    out["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    out["cu_seq_lens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return out


def flatten_packed(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A packed batch (collate_packed) -> one row ``[1, B*T]`` with ``cu_seq_lens`` at every
    restart of the position ids, so the attention kernel confines itself to each example without a
    block-diagonal mask (a row's end padding is a short segment of its own, with no labels)."""
    out = dict(batch)
    positions = batch["position_ids"].reshape(1, -1)
    out["input_ids"] = batch["input_ids"].reshape(1, -1)
    out["labels"] = batch["labels"].reshape(1, -1)
    out["position_ids"] = positions
    starts = (positions[0] == 0).nonzero().squeeze(-1)
    out["cu_seq_lens"] = torch.cat([starts, torch.tensor([positions.shape[1]])]).to(torch.int32)
    return out


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
