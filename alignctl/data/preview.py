"""`alignctl data preview`: the first rows of a data set as the model will see them.

    alignctl data preview algo=dpo dataset=hh-rlhf [model=...] [n=3] [split=train|eval] [--plain]

The rows go through the run's own code: the same composition and validation, ``load_rows`` (with
its eval hold-out), the tokenizer the run loads and the algorithm family's builder
(``build_sft_examples``, ``build_splits`` with ``build_pair_examples`` / ``build_kto_examples``,
``build_prompt_examples``). Each sequence is shown split into its parts (prompt | completion, or
prompt | chosen | rejected), with the tokens that carry loss marked, and token counts. Over the
whole split it counts how many rows truncation cuts (by building the same rows once more with
the length limits lifted) and what packing does. Nothing is written.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from alignctl.data.encode import IGNORE_INDEX
from alignctl.errors import ConfigError

USAGE = "usage: alignctl data preview [OVERRIDE ...] [n=3] [split=train|eval] [--plain]"
TEXT_DATA = ("sft", "pairs", "kto", "prompts")  # the registry's data kinds that are token sequences
HUGE = sys.maxsize // 2  # "no limit" for the lifted build that measures truncation


@dataclass
class Part:
    """A labelled stretch of one sequence: "prompt", "completion", "chosen", "text", ..."""

    name: str
    ids: List[int]
    loss: List[bool]  # per token: does it carry loss in the run
    full_length: int  # tokens before truncation
    # Per token: part of the answer (shown plainly) rather than context (dimmed); None: the whole
    # part is answer unless it is the prompt. Set for conversations (the assistant turns).
    answer: Optional[List[bool]] = None

    def is_answer(self) -> List[bool]:
        if self.answer is not None:
            return list(self.answer)
        return [self.name != "prompt"] * len(self.ids)


@dataclass
class SequenceView:
    """One sequence the model reads (one of a pair, a KTO example, an SFT example, a prompt)."""

    title: str  # "" for the only sequence of a row, else "chosen", "rejected", "desirable", ...
    parts: List[Part]

    @property
    def ids(self) -> List[int]:
        return [t for p in self.parts for t in p.ids]

    @property
    def loss(self) -> List[bool]:
        return [m for p in self.parts for m in p.loss]

    @property
    def truncated(self) -> bool:
        return any(len(p.ids) < p.full_length for p in self.parts)


@dataclass
class RowView:
    row_index: int
    line: Optional[int]
    sequences: List[SequenceView]


@dataclass
class SplitStats:
    rows: int  # rows read from the split
    examples: int  # sequences / pairs / examples built
    skipped: int  # rows dropped by dataset.skip_invalid
    truncated: Dict[str, int] = field(default_factory=dict)  # part name -> rows where it was cut
    truncated_rows: int = 0
    lengths: List[int] = field(default_factory=list)  # tokens per sequence
    loss_tokens: int = 0
    packing: str = ""  # SFT: what packing does (or would do) to the split


@dataclass
class Preview:
    algo: str
    family: str
    format: str
    source: str
    split: str
    limits: str  # the length settings, for the header
    rows: List[RowView]
    stats: SplitStats
    eval_origin: str = ""  # where the run's evaluation rows come from (load_rows says)
    tokenizer: Any = None  # decodes the shown ids
    tokenizer_name: str = ""


# --------------------------------------------------------------------------- the command


def data_command(args: List[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] != "preview":
        raise ConfigError(f"data {args[0]}: unknown sub-command; {USAGE}")
    return preview_command(args[1:])


def preview_command(args: List[str]) -> int:
    n, split, plain, overrides = _parse(args)
    preview = build_preview(overrides, n=n, split=split)
    from alignctl.data.preview_render import print_preview

    print_preview(preview, plain=plain)
    return 0


def _parse(args: Sequence[str]) -> Tuple[int, str, Optional[bool], List[str]]:
    n, split, plain, overrides = 3, "train", None, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--plain":
            plain = True
        elif sep and key == "n":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"n={value}: must be a whole number >= 1 (rows to show)")
            n = int(value)
        elif sep and key == "split":
            if value not in ("train", "eval"):
                raise ConfigError(f"split={value}: use split=train or split=eval")
            split = value
        else:
            overrides.append(arg)
    return n, split, plain, overrides


def build_preview(overrides: Sequence[str], n: int = 3, split: str = "train", tokenizer=None) -> Preview:
    """Compose and validate the job, then encode the split with the run's code."""
    from alignctl.compose import compose_job
    from alignctl.inputs import check_inputs
    from alignctl.validate import validate_job

    job = compose_job(list(overrides))
    validate_job(job)
    from alignctl.registry import algorithms_where, get_algorithm

    family = get_algorithm(job.algo.name).data  # which data path the run takes
    if family not in TEXT_DATA:
        covered = [name for kind in TEXT_DATA for name in algorithms_where(data=kind)]
        raise ConfigError(
            f"algo={job.algo.name}: data preview covers the text algorithms ({', '.join(covered)}); "
            "its data are not token sequences"
        )
    check_inputs(job)
    if tokenizer is None:
        from alignctl.models.load import load_tokenizer

        tokenizer = load_tokenizer(job.model)
    builder = {"sft": _sft, "pairs": _pairs, "kto": _kto, "prompts": _prompts}[family]
    preview = builder(job, tokenizer, n, split)
    preview.tokenizer = tokenizer
    preview.tokenizer_name = _tokenizer_name(job, tokenizer)
    return preview


def _tokenizer_name(job, tokenizer) -> str:
    model = job.model
    if model.arch is not None:
        return f"built-in byte-level tokenizer of model.arch ({len(tokenizer)} tokens)"
    source = model.tokenizer_name_or_path or model.name_or_path
    return f"{source}" + (f" ({model.gguf_file})" if model.gguf_file and not model.tokenizer_name_or_path else "")


def _rows(job, split: str, hold_out: bool = True):
    """The rows of ``split``, read as the run reads them (online algorithms hold out nothing)."""
    from alignctl.data.load import load_rows

    raw = load_rows(job.dataset, seed=job.train.seed, hold_out=hold_out)
    rows = raw.train if split == "train" else raw.eval
    if not rows:
        raise ConfigError(
            "split=eval: this data set has no evaluation rows; set dataset.eval_split or dataset.eval_fraction"
        )
    return raw, rows


def _variant(job, **changes):
    """A copy of the job with some ``algo`` fields changed (limits lifted, packing off, ...)."""
    lifted = copy.deepcopy(job)
    for key, value in changes.items():
        lifted.algo[key] = value
    return lifted


def _loss_mask(labels: Sequence[int]) -> List[bool]:
    """Tokens that carry loss: a label set, and not the first position (nothing predicts it)."""
    return [i > 0 and label != IGNORE_INDEX for i, label in enumerate(labels)]


def _count(stats: SplitStats, sequences: Sequence[SequenceView]) -> None:
    for sequence in sequences:
        stats.lengths.append(len(sequence.ids))
        stats.loss_tokens += sum(sequence.loss)


def _note_truncation(stats: SplitStats, sequences: Sequence[SequenceView]) -> None:
    cut = {p.name for s in sequences for p in s.parts if len(p.ids) < p.full_length}
    for name in cut:
        stats.truncated[name] = stats.truncated.get(name, 0) + 1
    stats.truncated_rows += bool(cut)


# --------------------------------------------------------------------------- SFT


def _sft(job, tokenizer, n: int, split: str) -> Preview:
    from alignctl.data.sft import build_sft_examples, pack_examples

    cfg = job.algo
    raw, rows = _rows(job, split)
    skip = job.dataset.skip_invalid
    # Unpacked, so each row is shown on its own; packing is measured below with the run's packer.
    data = build_sft_examples(rows, tokenizer, _variant(job, packing=False).algo, skip)
    # Untruncated lengths, and (completion-only labels) where each prompt ends.
    lifted = _variant(job, packing=False, max_length=HUGE, completion_only_loss=True).algo
    full = {e.row_index: e for e in build_sft_examples(rows, tokenizer, lifted, skip).examples}
    shown = data.examples[:n]
    # The shown rows once more with completion-only / assistant-only labels: they mark the
    # completion (or the assistant turns) even when the run trains on every token.
    wanted = {e.row_index for e in shown}
    marks_cfg = _variant(job, packing=False, completion_only_loss=True, assistant_only_loss=True).algo
    marked = build_sft_examples([r for r in rows if r.index in wanted], tokenizer, marks_cfg, True).examples
    marks = {e.row_index: e for e in marked}

    def sequence(example) -> SequenceView:
        loss = _loss_mask(example.labels)
        whole = full[example.row_index]
        mark = marks.get(example.row_index)
        if data.format == "prompt_completion" and mark is not None:
            cut, cut_full = _first_label(mark.labels), _first_label(whole.labels)
            ids = example.input_ids
            return SequenceView("", [
                Part("prompt", ids[:cut], loss[:cut], cut_full),
                Part("completion", ids[cut:], loss[cut:], len(whole.input_ids) - cut_full),
            ])
        name = "conversation" if data.format == "messages" else "text"
        answer = None
        if mark is not None and name == "conversation":
            answer = [label != IGNORE_INDEX for label in mark.labels]
        return SequenceView("", [Part(name, example.input_ids, loss, len(whole.input_ids), answer)])

    stats = _split_stats(rows, data, (
        [SequenceView("", [Part("sequence", e.input_ids, _loss_mask(e.labels), len(full[e.row_index].input_ids))])]
        for e in data.examples))
    packed = pack_examples(data.examples, cfg.max_length)
    verb = "go" if cfg.packing else "would go"
    rows_word = "row" if len(packed) == 1 else "rows"
    stats.packing = (
        f"{'on' if cfg.packing else 'off'}: the {len(data.examples)} examples {verb} into {len(packed)} {rows_word} "
        f"of <= {cfg.max_length} tokens ({_fill(packed, cfg.max_length):.0%} full)"
        + ("; the first token of each example carries no loss" if cfg.packing else "; algo.packing=true packs them")
    )
    views = [RowView(e.row_index, _line(rows, e.row_index), [sequence(e)]) for e in shown]
    limits = f"algo.max_length={cfg.max_length}, algo.truncation_mode={cfg.truncation_mode}"
    return Preview(job.algo.name, "sft", data.format, raw.source, split, limits, views, stats,
                   eval_origin=getattr(raw, "eval_origin", ""))


def _first_label(labels: Sequence[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _fill(packed, max_length: int) -> float:
    return sum(len(e.input_ids) for e in packed) / max(1, len(packed) * max_length)


# --------------------------------------------------------------------------- preference pairs


def _pair_builder(job, tokenizer, split: str, build, **extra):
    """The run's ``build_splits`` on ``job``; the built examples of ``split``."""
    from alignctl.algos.preference import build_splits

    raw, train, eval_data = build_splits(job, tokenizer, build, **extra)
    data = train if split == "train" else eval_data
    if data is None:
        raise ConfigError(
            "split=eval: this data set has no evaluation rows; set dataset.eval_split or dataset.eval_fraction"
        )
    return raw, (raw.train if split == "train" else raw.eval), data


def _pairs(job, tokenizer, n: int, split: str) -> Preview:
    from alignctl.algos.preference import pair_options
    from alignctl.data.pairwise import build_pair_examples

    cfg = job.algo
    raw, rows, data = _pair_builder(job, tokenizer, split, build_pair_examples, **pair_options(job))
    lifted = _variant(job, max_length=HUGE, max_prompt_length=HUGE - 1)
    _, _, full_data = _pair_builder(lifted, tokenizer, split, build_pair_examples, **pair_options(job))
    full = {e.row_index: e for e in full_data.examples}
    reward_model = job.algo.name == "reward"

    def sequences(example) -> List[SequenceView]:
        whole = full[example.row_index]
        out = []
        for which in ("chosen", "rejected"):
            ids, labels = example.sequence(which)
            loss = _loss_mask(labels)
            if reward_model:  # a sequence classifier: the loss reads the score at the last token only
                loss = [i == len(ids) - 1 for i in range(len(ids))]
            cut = len(example.prompt_ids)
            answer = getattr(whole, f"{which}_ids")
            out.append(SequenceView(which, [
                Part("prompt", ids[:cut], loss[:cut], len(whole.prompt_ids)),
                Part(which, ids[cut:], loss[cut:], len(answer)),
            ]))
        return out

    stats = _split_stats(rows, data, (sequences(e) for e in data.examples))
    views = [RowView(e.row_index, _line(rows, e.row_index), sequences(e)) for e in data.examples[:n]]
    limits = _pair_limits(cfg)
    return Preview(job.algo.name, "pairs", data.format, raw.source, split, limits, views, stats,
                   eval_origin=getattr(raw, "eval_origin", ""))


def _pair_limits(cfg) -> str:
    return (f"algo.max_length={cfg.max_length}, algo.max_prompt_length={cfg.max_prompt_length}, "
            f"algo.truncation_mode={cfg.truncation_mode}")


def _split_stats(rows, data, sequence_groups) -> "SplitStats":
    """Counts over the whole split: one group of sequences per row (a pair's two, a KTO row's examples)."""
    stats = SplitStats(rows=len(rows), examples=len(data.examples), skipped=data.skipped)
    for seqs in sequence_groups:
        _count(stats, seqs)
        _note_truncation(stats, seqs)
    return stats


# --------------------------------------------------------------------------- KTO


def _kto(job, tokenizer, n: int, split: str) -> Preview:
    from alignctl.data.kto import build_kto_examples

    cfg = job.algo
    kl_pairs = cfg.loss_type == "kto"
    raw, rows, data = _pair_builder(job, tokenizer, split, build_kto_examples, kl_pairs=kl_pairs)
    lifted = _variant(job, max_length=HUGE, max_prompt_length=HUGE - 1)
    _, _, full_data = _pair_builder(lifted, tokenizer, split, build_kto_examples, kl_pairs=False)
    full = {(e.row_index, e.label): e for e in full_data.examples}

    def sequence(example) -> SequenceView:
        whole = full[(example.row_index, example.label)]
        loss = _loss_mask(example.labels)
        cut = len(example.prompt_ids)
        return SequenceView("desirable" if example.label else "undesirable", [
            Part("prompt", example.prompt_ids, loss[:cut], len(whole.prompt_ids)),
            Part("completion", example.completion_ids, loss[cut:], len(whole.completion_ids)),
        ])

    by_row: Dict[int, List] = {}
    for example in data.examples:
        by_row.setdefault(example.row_index, []).append(example)
    stats = _split_stats(rows, data, ([sequence(e) for e in examples] for examples in by_row.values()))
    views = [RowView(i, _line(rows, i), [sequence(e) for e in by_row[i]]) for i in list(by_row)[:n]]
    limits = _pair_limits(cfg)
    return Preview(job.algo.name, "kto", data.format, raw.source, split, limits, views, stats,
                   eval_origin=getattr(raw, "eval_origin", ""))


# --------------------------------------------------------------------------- prompts (online RL)


def _prompts(job, tokenizer, n: int, split: str) -> Preview:
    from alignctl.data.prompts import build_prompt_examples

    cfg = job.algo
    raw, rows = _rows(job, split, hold_out=False)

    def build(max_prompt_length: int):
        return build_prompt_examples(
            rows, tokenizer, max_prompt_length=max_prompt_length,
            truncation_mode=cfg.truncation_mode, skip_invalid=job.dataset.skip_invalid,
        )

    data = build(cfg.max_prompt_length)
    full = {e.row_index: e for e in build(HUGE).examples}

    def sequence(example) -> SequenceView:
        ids = example.prompt_ids
        return SequenceView("", [Part("prompt", ids, [False] * len(ids), len(full[example.row_index].prompt_ids))])

    stats = _split_stats(rows, data, ([sequence(e)] for e in data.examples))
    views = [RowView(e.row_index, _line(rows, e.row_index), [sequence(e)]) for e in data.examples[:n]]
    limits = f"algo.max_prompt_length={cfg.max_prompt_length}, algo.truncation_mode={cfg.truncation_mode}"
    return Preview(job.algo.name, "prompts", data.format, raw.source, split, limits, views, stats,
                   eval_origin=getattr(raw, "eval_origin", ""))


def _line(rows, index: int) -> Optional[int]:
    return next((r.line for r in rows if r.index == index), None)
