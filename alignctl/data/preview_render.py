"""Text of `alignctl data preview`: each part of a sequence on its own line, loss tokens marked.

On a terminal the tokens that carry loss are highlighted, context the model only reads is dimmed.
Elsewhere (a pipe, a file, ``--plain``) the loss tokens are wrapped in ``[[...]]``. Token spans are
decoded with the sequence's whole prefix, so a span's text is exactly what it adds to the text
before it (byte-level and SentencePiece tokenizers decode a lone span differently).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

LOSS_STYLE = "bold green"
CONTEXT_STYLE = "dim"
OPEN, CLOSE = "[[", "]]"


def spans(part, ids_before: Sequence[int], tokenizer) -> List[Tuple[str, bool, bool]]:
    """(text, carries loss, is answer) for each run of tokens of ``part`` sharing both flags."""
    out: List[Tuple[str, bool, bool]] = []
    loss, answer = part.loss, part.is_answer()
    start = 0
    for end in range(1, len(part.ids) + 1):
        if end == len(part.ids) or (loss[end], answer[end]) != (loss[start], answer[start]):
            text = decode_span(tokenizer, list(ids_before) + part.ids[:start], part.ids[start:end])
            out.append((text, loss[start], answer[start]))
            start = end
    return out


def decode_span(tokenizer, before: List[int], span: List[int]) -> str:
    def decode(ids: List[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    head, whole = decode(before), decode(before + span)
    if before and whole.startswith(head):
        return whole[len(head):]
    return decode(span)


def plain_text(part, ids_before: Sequence[int], tokenizer) -> str:
    """The part's text with loss-carrying spans wrapped in [[...]]."""
    return "".join(f"{OPEN}{text}{CLOSE}" if loss else text for text, loss, _ in spans(part, ids_before, tokenizer))


def rich_text(part, ids_before: Sequence[int], tokenizer):
    from rich.text import Text

    text = Text()
    for chunk, loss, answer in spans(part, ids_before, tokenizer):
        text.append(chunk, style=LOSS_STYLE if loss else ("" if answer else CONTEXT_STYLE))
    return text


def print_preview(preview, plain: Optional[bool] = None, tokenizer=None, console=None) -> None:
    """Print the header, the split's statistics and the shown rows."""
    from rich.console import Console

    console = console or Console(highlight=False, soft_wrap=True)
    plain = (not console.is_terminal) if plain is None else plain
    tokenizer = tokenizer or preview.tokenizer
    for line in header_lines(preview):
        console.print(line, markup=False)
    if plain:
        console.print(f"loss-carrying tokens are inside {OPEN} {CLOSE}", markup=False)
    else:
        console.print(f"[{LOSS_STYLE}]green: tokens that carry loss[/]   [{CONTEXT_STYLE}]dim: context, no loss[/]")
    for row in preview.rows:
        console.print()
        where = f"row {row.row_index}" + (f" (line {row.line})" if row.line is not None else "")
        console.print(where, style=None if plain else "bold", markup=False)
        for sequence in row.sequences:
            console.print("  " + sequence_summary(sequence), markup=False)
            before: List[int] = []
            for part in sequence.parts:
                label = f"    {part.name + ':':<14}"
                if plain:
                    body = plain_text(part, before, tokenizer).replace("\n", "\n" + " " * len(label))
                    console.print(label + body, markup=False)
                else:
                    from rich.text import Text

                    body = rich_text(part, before, tokenizer)
                    lines = body.split("\n", include_separator=True)
                    console.print(Text(label) + Text(" " * len(label)).join(lines))
                before = before + part.ids


def sequence_summary(sequence) -> str:
    """"chosen: prompt 12 + chosen 7 = 19 tokens, 7 carry loss (prompt cut from 40)"."""
    counts = " + ".join(f"{p.name} {len(p.ids)}" for p in sequence.parts)
    total = len(sequence.ids)
    text = (f"{sequence.title}: " if sequence.title else "") + (
        f"{counts} = {total} tokens" if len(sequence.parts) > 1 else f"{total} tokens"
    )
    text += f", {sum(sequence.loss)} carry loss"
    cuts = [f"{p.name} cut from {p.full_length}" for p in sequence.parts if len(p.ids) < p.full_length]
    if cuts:
        text += " (" + "; ".join(cuts) + ")"
    return text


def header_lines(preview) -> List[str]:
    stats = preview.stats
    lines = [
        f"data preview: algo={preview.algo}, {preview.source}, split {preview.split}, format {preview.format}",
        f"tokenizer: {preview.tokenizer_name}; {preview.limits}",
    ]
    unit = {"pairs": "pairs", "prompts": "prompts"}.get(preview.family, "examples")
    built = f"{_n(stats.rows, 'row')} -> {stats.examples} {unit}"
    if stats.skipped:
        built += f", {_n(stats.skipped, 'row')} skipped (dataset.skip_invalid=true)"
    lines.append(built)
    if preview.eval_origin and preview.family != "prompts":
        lines.append(f"evaluation rows: {preview.eval_origin}")
    if stats.lengths:
        mean = sum(stats.lengths) / len(stats.lengths)
        lines.append(
            f"tokens per sequence: mean {mean:.1f}, max {max(stats.lengths)}; "
            f"{stats.loss_tokens} of {sum(stats.lengths)} tokens carry loss"
        )
    if stats.truncated_rows:
        parts = ", ".join(f"{name} in {count}" for name, count in stats.truncated.items())
        lines.append(f"truncation: {stats.truncated_rows} of {_n(stats.examples, 'row')} cut ({parts})")
    else:
        lines.append("truncation: no row is cut")
    if stats.packing:
        lines.append(f"packing {stats.packing}")
    if preview.family == "prompts":
        lines.append("prompts only: the loss is taken on the responses the policy generates during the run")
    if preview.algo == "reward":
        lines.append("reward model: the loss reads the score the model gives at each sequence's last token (marked)")
    return lines


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
