"""Unpaired (KTO) data: one prompt + one completion + a desirable/undesirable label per example.

Layouts (detected from the columns of the first row, after ``dataset.columns`` renames):

- ``prompt`` + ``completion`` + ``label`` (bool), as strings (TRL's convention: the completion
  follows the prompt directly, so it usually begins with a space) or as message lists
  (conversational: the prompt rendered with the chat template and its generation prompt, the
  completion being the text the template adds after it), exactly as the pairwise path renders them;
- paired data (``prompt`` + ``chosen`` + ``rejected``, or ``chosen`` + ``rejected`` with a shared
  start, strings or messages) is converted to unpaired, as TRL's ``unpair_preference_dataset``:
  each pair gives a desirable example (chosen, ``label=True``) and an undesirable one (rejected,
  ``label=False``). Validation, prompt extraction and tokenization are the pairwise path's own
  (:func:`alignctl.data.pairwise.build_pair_examples`), so both examples of a pair share the same
  prompt ids. The two examples of a pair stay next to each other (TRL puts all chosen rows first),
  so unshuffled evaluation batches hold both kinds.

Truncation is the pairwise rule applied to each example on its own, as TRL's ``KTOTrainer`` does
after unpairing: when prompt + completion exceed ``max_length``, the prompt is cut to
``max_prompt_length`` (``truncation_mode``), then the completion to ``max_length - max_prompt_length``.

The KL term of KTO is estimated on *mismatched* pairs: a prompt followed by the completion of a
different example (TRL rotates completions by one within each chunk of a batch's size when it
builds its KL dataset, before shuffling, so its pairing is fixed at data-build time too). Here the
pairing is fixed over the whole data set when the examples are built (:func:`assign_kl_partners`):
example ``i`` gets the completion of example ``(i + s) mod N``, with the smallest shift ``s >= 1``
for which no example meets a completion that follows its own prompt (``s = 1`` for typical unpaired
data, ``s = 2`` for converted pairs). Being a rotation, every completion is used exactly once as a
KL completion. Because the pairing does not depend on how the loader batches examples:

- precomputed reference log-probs of the KL sequences stay valid whatever the shuffling, and the
  precomputed and live reference paths give the same losses;
- a batch of one example still has a mismatched KL sequence.

With a single example there is nothing to pair with: it gets no KL sequence, the batch carries no
KL rows and the loss uses a KL estimate of 0 (TRL's value when it does not estimate the KL).
The KL pair is truncated with the same rule as a main example.

:func:`collate_kto` builds ONE batch for a single forward pass: rows ``0..B-1`` are the main
sequences (prompt + completion), rows ``B..2B-1`` the KL sequences, right padded together.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from alignctl.data.collate import pad_right
from alignctl.data.encode import IGNORE_INDEX, encode_completion, encode_prompt, render_chat_completion
from alignctl.data.load import Row, encode_each, names_file, require_messages
from alignctl.data.pairwise import (
    CHAT_SUFFIX,
    PairExample,
    _check_lengths,
    build_pair_examples,
    detect_pair_format,
    truncate_pair,
)
from alignctl.errors import DataError

UNPAIRED = "prompt_completion_label"
CONVERTED = " -> unpaired"  # appended to a pairwise format name when pairs were converted
UNPAIRED_HINT = (
    "KTO data needs 'prompt' + 'completion' + 'label' (true = desirable, false = undesirable), or "
    "preference pairs ('prompt' + 'chosen' + 'rejected', or 'chosen' + 'rejected'), which are converted; "
    "map your columns with dataset.columns, e.g. dataset.columns.{field}=<your column>"
)
# The KTO paper (Ethayarajh et al. 2024, eq. 8) recommends
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3].
RATIO_LOW, RATIO_HIGH = 1.0, 4.0 / 3.0
MAX_KL_SHIFT = 64  # rotations tried when looking for a pairing without same-prompt pairs


# --------------------------------------------------------------------------- examples


@dataclass
class KTOExample:
    """One tokenized unpaired example and its fixed KL partner sequence."""

    prompt_ids: List[int]
    completion_ids: List[int]  # EOS appended (plain text) or the template's end tags (chat)
    label: bool  # True: desirable
    row_index: int = -1
    # The mismatched (prompt, completion) pair for the KL estimate, set by assign_kl_partners;
    # None when the data set has a single example.
    kl_prompt_ids: Optional[List[int]] = None
    kl_completion_ids: Optional[List[int]] = None
    # Summed reference log-probs (main, KL) when precomputed; KL is None without a KL sequence.
    ref_logps: Optional[Tuple[float, Optional[float]]] = None

    @property
    def input_ids(self) -> List[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def labels(self) -> List[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(self.completion_ids)

    @property
    def has_kl(self) -> bool:
        return self.kl_completion_ids is not None

    @property
    def kl_input_ids(self) -> List[int]:
        return list(self.kl_prompt_ids or []) + list(self.kl_completion_ids or [])

    @property
    def kl_labels(self) -> List[int]:
        return [IGNORE_INDEX] * len(self.kl_prompt_ids or []) + list(self.kl_completion_ids or [])


@dataclass
class KTOData:
    examples: List[KTOExample]
    skipped: int  # rows (or converted examples) dropped because skip_invalid was set
    format: str  # prompt_completion_label[_chat], or "<pair format> -> unpaired"
    kl_shift: int = 0  # rotation of the KL pairing (0: no KL sequences)
    kl_same_prompt: int = 0  # KL pairs whose completion follows its own prompt text (unavoidable ones)

    @property
    def converted(self) -> bool:
        return self.format.endswith(CONVERTED)

    @property
    def num_desirable(self) -> int:
        return sum(1 for e in self.examples if e.label)

    @property
    def num_undesirable(self) -> int:
        return sum(1 for e in self.examples if not e.label)


def detect_kto_format(rows: Sequence[Row]) -> str:
    """``prompt_completion_label`` (+ ``_chat``) for unpaired data, else the pairwise layout."""
    if not rows:
        raise DataError("KTO data set has no rows")
    first = rows[0]
    if "completion" in first.data or "label" in first.data:
        for needed in ("prompt", "completion", "label"):
            if needed not in first.data:
                raise DataError(
                    f"row {first.index}: missing column '{needed}' (columns: {', '.join(first.data) or 'none'}); "
                    + UNPAIRED_HINT.format(field=needed)
                )
        chat = isinstance(first.data["prompt"], list) or isinstance(first.data["completion"], list)
        return UNPAIRED + (CHAT_SUFFIX if chat else "")
    if "chosen" in first.data and "rejected" in first.data:
        return detect_pair_format(rows)
    missing = "completion" if "prompt" in first.data else "prompt"
    raise DataError(
        f"row {first.index}: no 'completion'/'label' or 'chosen'/'rejected' columns "
        f"(columns: {', '.join(first.data) or 'none'}); " + UNPAIRED_HINT.format(field=missing)
    )


@names_file
def build_kto_examples(
    rows: Sequence[Row],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
    skip_invalid: bool = False,
    kl_pairs: bool = True,
) -> KTOData:
    """Validate, tokenize and truncate every example; fix the KL pairing when ``kl_pairs``.

    Invalid rows raise a DataError naming the row and the field, or are counted in
    ``KTOData.skipped`` and dropped when ``skip_invalid``.
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    fmt = detect_kto_format(rows)
    bos = tokenizer.bos_token_id
    if fmt.startswith(UNPAIRED):
        chat = fmt.endswith(CHAT_SUFFIX)
        candidates, skipped = encode_each(
            rows, lambda row: _encode_unpaired_row(row, chat, tokenizer, add_eos), skip_invalid
        )
    else:
        # The pairwise path validates, extracts implicit prompts and tokenizes (prompt ids shared);
        # truncation is left to the per-example step below, so the limit here is "none".
        pairs = build_pair_examples(
            rows,
            tokenizer,
            max_length=sys.maxsize,
            max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
            add_eos=add_eos,
            skip_invalid=skip_invalid,
        )
        skipped = pairs.skipped
        candidates = unpair(pairs.examples)
        fmt += CONVERTED
    examples, too_long = encode_each(
        candidates,
        lambda example: truncate_example(example, max_length, max_prompt_length, truncation_mode, bos_token_id=bos),
        skip_invalid,
    )
    skipped += too_long
    if not examples:
        raise DataError(f"no usable KTO examples left ({skipped} rows were skipped as invalid)")
    data = KTOData(examples=examples, skipped=skipped, format=fmt)
    if kl_pairs:
        data.kl_shift, data.kl_same_prompt = assign_kl_partners(
            examples, max_length, max_prompt_length, truncation_mode, bos_token_id=bos
        )
    return data


def unpair(pairs: Sequence[PairExample]) -> List[KTOExample]:
    """Each pair -> (chosen, label True), (rejected, label False), next to each other, same prompt ids."""
    out: List[KTOExample] = []
    for pair in pairs:
        out.append(KTOExample(pair.prompt_ids, pair.chosen_ids, True, row_index=pair.row_index))
        out.append(KTOExample(pair.prompt_ids, pair.rejected_ids, False, row_index=pair.row_index))
    return out


def truncate_example(
    example: KTOExample,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    *,
    bos_token_id: Optional[int] = None,
) -> KTOExample:
    """The pairwise truncation rule (:func:`truncate_pair`) on one completion, in place."""
    pair = PairExample(example.prompt_ids, example.completion_ids, example.completion_ids, row_index=example.row_index)
    truncate_pair(pair, max_length, max_prompt_length, truncation_mode, bos_token_id=bos_token_id)
    example.prompt_ids, example.completion_ids = pair.prompt_ids, pair.chosen_ids
    return example


def assign_kl_partners(
    examples: List[KTOExample],
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    *,
    bos_token_id: Optional[int] = None,
) -> Tuple[int, int]:
    """Give example ``i`` the KL sequence prompt_i + completion_{(i + s) mod N}, in place.

    ``s`` is the smallest shift in ``1..min(N - 1, 64)`` for which no example's KL completion comes
    from an example with the same prompt tokens; when every shift has such a pair (most examples
    share one prompt), ``s = 1``. Returns ``(s, same-prompt KL pairs)``; ``(0, 0)`` when ``N < 2``
    (no KL sequence at all).
    """
    n = len(examples)
    for example in examples:
        example.kl_prompt_ids = example.kl_completion_ids = None
    if n < 2:
        return 0, 0
    ids: Dict[Tuple[int, ...], int] = {}
    prompt_key = [ids.setdefault(tuple(e.prompt_ids), len(ids)) for e in examples]

    def collisions(shift: int, stop_at_first: bool) -> int:
        count = 0
        for i in range(n):
            if prompt_key[i] == prompt_key[(i + shift) % n]:
                count += 1
                if stop_at_first:
                    break
        return count

    shift = next((s for s in range(1, min(n - 1, MAX_KL_SHIFT) + 1) if collisions(s, True) == 0), 1)
    same = collisions(shift, False)
    for i, example in enumerate(examples):
        partner = examples[(i + shift) % n]
        kl = PairExample(example.prompt_ids, partner.completion_ids, partner.completion_ids, row_index=example.row_index)
        try:
            truncate_pair(kl, max_length, max_prompt_length, truncation_mode, bos_token_id=bos_token_id)
        except DataError:
            # Empty prompt + one-token completion: nothing is scored, the KL row counts 0 for policy
            # and reference alike. truncate_pair has already cut the pair when it raises.
            pass
        example.kl_prompt_ids, example.kl_completion_ids = kl.prompt_ids, kl.chosen_ids
    return shift, same


# --------------------------------------------------------------------------- one unpaired row


def require_label(row: Row) -> bool:
    """The bool in ``label``, or a DataError naming the row and the value."""
    if "label" not in row.data:
        raise DataError(
            f"row {row.index}: missing column 'label' (columns: {', '.join(row.data) or 'none'}); "
            + UNPAIRED_HINT.format(field="label")
        )
    value = row.data["label"]
    if not isinstance(value, bool):
        raise DataError(f"row {row.index}: column 'label' must be true or false, got {value!r}")
    return value


def _encode_unpaired_row(row: Row, chat: bool, tokenizer, add_eos: bool) -> KTOExample:
    label = require_label(row)
    prompt = _unpaired_field(row, "prompt", chat, allow_empty=not chat)
    completion = _unpaired_field(row, "completion", chat)
    if chat:
        # Same rendering as pairwise chat data: the template supplies BOS and end-of-turn tags.
        prompt_text, completion_text = render_chat_completion(tokenizer, prompt, completion, row.index)
        return KTOExample(
            tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
            tokenizer(completion_text, add_special_tokens=False)["input_ids"],
            label,
            row_index=row.index,
        )
    return KTOExample(
        encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion, add_eos), label, row_index=row.index
    )


def _unpaired_field(row: Row, name: str, chat: bool, allow_empty: bool = False):
    if name not in row.data:
        raise DataError(
            f"row {row.index}: missing column '{name}' (columns: {', '.join(row.data) or 'none'}); "
            + UNPAIRED_HINT.format(field=name)
        )
    value = row.data[name]
    if value is None:
        raise DataError(f"row {row.index}: column '{name}' is empty (null)")
    if chat:
        if isinstance(value, str):
            raise DataError(
                f"row {row.index}: column '{name}' is a string, but this data set is conversational "
                "(its first row holds message lists); use message lists in every row"
            )
        messages = require_messages(row, name)
        if not allow_empty and not any(str(m.get("content", "")).strip() for m in messages):
            raise DataError(f"row {row.index}: column '{name}' is empty (every message has empty content)")
        return messages
    if not isinstance(value, str):
        raise DataError(
            f"row {row.index}: column '{name}' must be a string like the first row's, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise DataError(f"row {row.index}: column '{name}' is empty")
    return value


# --------------------------------------------------------------------------- balance of the two kinds


def weight_advice(num_desirable: int, num_undesirable: int, desirable_weight: float, undesirable_weight: float) -> Optional[str]:
    """A warning text when ``desirable_weight * n_d / (undesirable_weight * n_u)`` is outside [1, 4/3].

    The suggested ranges are TRL's (``KTOTrainer.__init__``): EITHER ``desirable_weight`` in
    ``[uw * n_u / n_d, 4/3 * uw * n_u / n_d]`` OR ``undesirable_weight`` in
    ``[dw * n_d / (4/3 * n_u), dw * n_d / n_u]``. None when the ratio is in range.
    """
    if num_desirable == 0 or num_undesirable == 0:
        kind, other = ("desirable", "undesirable") if num_undesirable == 0 else ("undesirable", "desirable")
        return (
            f"the training data has only {kind} examples ({max(num_desirable, num_undesirable)}) and no {other} ones; "
            "KTO learns from both, so check the 'label' column"
        )
    if desirable_weight <= 0 or undesirable_weight <= 0:
        return f"algo.desirable_weight={desirable_weight}, algo.undesirable_weight={undesirable_weight}: a kind of example is ignored"
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    if RATIO_LOW <= ratio <= RATIO_HIGH + 1e-12:
        return None
    d_low = undesirable_weight * num_undesirable / num_desirable
    u_high = desirable_weight * num_desirable / num_undesirable
    return (
        f"{num_desirable} desirable / {num_undesirable} undesirable examples with desirable_weight={desirable_weight:g}, "
        f"undesirable_weight={undesirable_weight:g} give desirable_weight*n_d/(undesirable_weight*n_u) = {ratio:.3g}, "
        f"outside the KTO paper's recommended [1, 4/3]; set EITHER algo.desirable_weight in "
        f"[{d_low:.3g}, {d_low * RATIO_HIGH:.3g}] OR algo.undesirable_weight in [{u_high / RATIO_HIGH:.3g}, {u_high:.3g}]"
    )


def warn_if_unbalanced(data: KTOData, desirable_weight: float, undesirable_weight: float) -> Optional[str]:
    """:func:`weight_advice` on a data set, also raised as a ``UserWarning``; returns the text."""
    advice = weight_advice(data.num_desirable, data.num_undesirable, desirable_weight, undesirable_weight)
    if advice:
        warnings.warn(advice, UserWarning, stacklevel=2)
    return advice


# --------------------------------------------------------------------------- batches


def collate_kto(examples: Sequence[KTOExample], pad_token_id: int, with_kl: bool = True) -> Dict[str, torch.Tensor]:
    """One concatenated batch of main and KL sequences for a single forward pass.

    Rows ``0..B-1``: prompt_i + completion_i; rows ``B..2B-1`` (when ``with_kl`` and the examples
    have KL partners): the fixed mismatched pair of each example. Right padded to the longest of
    all rows; ``labels`` mask prompts and padding. ``label`` [B] bool, ``row_index`` [B],
    ``seq_lengths`` [rows]; ``ref_logps`` [rows] (main then KL) when every example has precomputed
    reference log-probs.
    """
    if not examples:
        raise ValueError("collate_kto needs at least one example")
    ids = [e.input_ids for e in examples]
    labels = [e.labels for e in examples]
    kl = with_kl and examples[0].has_kl
    if with_kl and any(e.has_kl != kl for e in examples):
        raise ValueError("collate_kto: some examples have a KL partner and some do not")
    if kl:
        ids += [e.kl_input_ids for e in examples]
        labels += [e.kl_labels for e in examples]
    batch = {
        "input_ids": pad_right(ids, pad_token_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "labels": pad_right(labels, IGNORE_INDEX),
        "label": torch.tensor([bool(e.label) for e in examples], dtype=torch.bool),
        "row_index": torch.tensor([e.row_index for e in examples], dtype=torch.long),
        "seq_lengths": torch.tensor([len(s) for s in ids], dtype=torch.long),
    }
    refs = [e.ref_logps for e in examples]
    if all(r is not None for r in refs):
        values = [r[0] for r in refs]
        if kl:
            if any(r[1] is None for r in refs):
                raise ValueError("collate_kto: precomputed reference log-probs lack the KL sequence")
            values += [r[1] for r in refs]
        batch["ref_logps"] = torch.tensor(values, dtype=torch.float32)
    return batch


__all__ = [
    "KTOData",
    "KTOExample",
    "assign_kl_partners",
    "build_kto_examples",
    "collate_kto",
    "detect_kto_format",
    "require_label",
    "truncate_example",
    "unpair",
    "warn_if_unbalanced",
    "weight_advice",
]
