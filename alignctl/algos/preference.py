"""Pieces shared by the pairwise preference algorithms (DPO, CPO, ORPO, reward modelling)."""

from __future__ import annotations

import time
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from alignctl.data.load import load_rows
from alignctl.data.pairwise import PairExample, build_pair_examples, collate_pairs
from alignctl.engine.offline import Metrics, PreparedData
from alignctl.models.logps import CausalLMWithLogps, TokenLogps
from alignctl.models.policy import build_policy
from alignctl.models.reference import ReferenceModel, disable_dropout
from alignctl.tracking import task_progress


def build_splits(job: DictConfig, tokenizer, build_examples, **extra):
    """Load the data set and build train and eval examples with the algo's length settings.

    ``build_examples`` is build_pair_examples or build_kto_examples; returns (raw, train, eval or None).
    """
    cfg = job.algo
    raw = load_rows(job.dataset, seed=job.train.seed)

    def build(rows):
        return build_examples(
            rows,
            tokenizer,
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            truncation_mode=cfg.truncation_mode,
            add_eos=cfg.add_eos,
            skip_invalid=job.dataset.skip_invalid,
            **extra,
        )

    return raw, build(raw.train), build(raw.eval) if raw.eval else None


def pair_options(job: DictConfig) -> Dict[str, object]:
    """The pairwise tokenization settings beyond the length limits (shared with data preview)."""
    return {"add_bos_to_prompt": job.algo.add_bos_to_prompt, "truncation": job.algo.truncation}


def prepare_pair_data(job: DictConfig, tokenizer) -> PreparedData:
    """Rows -> PairExamples for train and eval, with a collate that keeps precomputed ref log-probs."""
    raw, train, eval_data = build_splits(job, tokenizer, build_pair_examples, **pair_options(job))
    notes = [("data", f"{raw.source} ({train.format}, {len(train.examples)} train pairs"
              + (f", {len(eval_data.examples)} eval pairs)" if eval_data else ")"))]
    if train.skipped:
        notes.append(("skipped rows", f"{train.skipped} (dataset.skip_invalid=true)"))
    return PreparedData(
        train=train.examples,
        eval=eval_data.examples if eval_data else None,
        collate=partial(collate_pairs_with_ref, pad_token_id=tokenizer.pad_token_id),
        notes=notes,
        eval_origin=raw.eval_origin,
    )


def collate_pairs_with_ref(examples: List[PairExample], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """collate_pairs, plus ``ref_logps`` [2B] (chosen first) when they were precomputed."""
    batch = collate_pairs(examples, pad_token_id)
    refs = [getattr(e, "ref_logps", None) for e in examples]
    if all(r is not None for r in refs):
        batch["ref_logps"] = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
    return batch


def forward_pairs(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> TokenLogps:
    """One forward of the concatenated chosen+rejected batch through the log-prob wrapper (one
    result per sequence, padded or padding-free)."""
    return TokenLogps.from_dict(
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
            position_ids=batch.get("position_ids"),
            cu_seq_lens=batch.get("cu_seq_lens"),
        ),
        seq_len=int(batch["seq_lengths"].max()),
    )


def split_pairs(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[2B] -> ([B] chosen, [B] rejected)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


def logp_metrics(out: TokenLogps) -> Metrics:
    """logps/* (mean summed log-prob per sequence) and logits/* (mean logit over answer tokens and vocab)."""
    chosen_sum, rejected_sum = split_pairs(out.sum_logps.detach())
    chosen_logits, rejected_logits = split_pairs(out.logits_sum)
    chosen_n, rejected_n = split_pairs(out.num_tokens)
    return {
        "logps/chosen": chosen_sum.mean(),
        "logps/rejected": rejected_sum.mean(),
        "logits/chosen": chosen_logits.sum() / chosen_n.sum().clamp(min=1),
        "logits/rejected": rejected_logits.sum() / rejected_n.sum().clamp(min=1),
    }


def build_policy_with_reference(job: DictConfig, tokenizer, *, reference_free: bool) -> Tuple[torch.nn.Module, ReferenceModel]:
    """The policy behind the log-prob wrapper (dropout off, as the reference) and its reference."""
    policy = build_policy(job, tokenizer)
    disable_dropout(policy)
    reference = ReferenceModel.build(job, policy, tokenizer, reference_free=reference_free)
    return CausalLMWithLogps(policy, chunk_size=job.train.logps_chunk_size), reference


REFERENCE_NOTES = {
    "copy": "frozen copy",
    "adapter": "LoRA adapter disabled",
    "initial": "the policy before its first step",
    "precomputed": "precomputed log-probs",
    "none": "none (reference-free)",
}


def choose_reference_precompute(job: DictConfig, data: PreparedData) -> None:
    """Resolve ``algo.precompute_ref_logps=null`` into the job, with a summary note.

    On when the reference would be a held model (a frozen copy, or ``model.ref_name_or_path``) and
    the run goes through every training example at least once: the reference then does the same
    forward passes either way, only all before the first step, and training holds no second model
    (DPO on SmolLM2-135M: 0.25 GB less at bf16). Off for a LoRA policy (its reference is the
    adapter switched off, nothing is held), for TR-DPO (the reference moves), and for runs that
    stop before the end of the data (precomputing would pay for examples never trained on).
    """
    algo = job.algo
    if algo.precompute_ref_logps is not None:
        return
    from accelerate import PartialState

    from alignctl.engine.optim import plan_steps

    tcfg = job.train
    per_batch = tcfg.per_device_batch_size * PartialState().num_processes  # examples per micro-batch, all processes
    batches_per_epoch = -(-len(data.train) // per_batch)
    seen = plan_steps(tcfg, batches_per_epoch) * tcfg.gradient_accumulation_steps * per_batch
    passes = seen / max(1, len(data.train))
    if algo.get("reference_free") or algo.get("sync_ref_model"):
        why = "the reference " + ("is none" if algo.get("reference_free") else "moves (algo.sync_ref_model)")
    elif job.peft.method != "none" and not job.model.ref_name_or_path:
        why = "the reference is the LoRA policy with its adapter off: no model to drop"
    elif passes < 1:
        why = f"the run covers {passes:.0%} of the training data"
    else:
        algo.precompute_ref_logps = True
        data.notes.append(("reference precompute", f"on (algo.precompute_ref_logps=null: the run covers the training data "
                                                   f"{passes:.1f} times, so no reference model is held while training)"))
        return
    algo.precompute_ref_logps = False
    data.notes.append(("reference precompute", f"off (algo.precompute_ref_logps=null: {why})"))


def attach_reference(reference: ReferenceModel, job: DictConfig, accelerator, model, data: PreparedData) -> None:
    """Put a held reference on the device; with ``algo.precompute_ref_logps`` compute its log-probs
    for every train and eval example now and drop it, so training holds no reference at all."""
    if reference.mode == "copy":
        reference.to(accelerator.device)
    if job.algo.precompute_ref_logps and reference.mode in ("copy", "adapter", "initial"):
        model.to(accelerator.device)
        start = time.perf_counter()
        batch_size = job.train.per_device_eval_batch_size or job.train.per_device_batch_size
        parts = (data.train, data.eval or [])
        batches = sum(-(-len(examples) // batch_size) for examples in parts)
        shown = accelerator.is_main_process and job.run.progress
        with task_progress("reference log-probs", batches, enabled=shown) as bar:
            for examples in parts:
                precompute_reference(reference, examples, data.collate, batch_size, accelerator, on_batch=bar.advance)
        reference.release()
        data.notes.append(("reference log-probs", f"precomputed in {time.perf_counter() - start:.1f} s"))
    data.notes.append(("reference", REFERENCE_NOTES[reference.mode]))


@torch.no_grad()
def precompute_reference(reference: ReferenceModel, examples, collate, batch_size: int, accelerator,
                         on_batch: Optional[Callable[[], None]] = None) -> None:
    """Store on every example (``ref_logps``) the summed reference log-probs of its two rows.

    Batches lay out B examples as two halves of rows (chosen then rejected for pairs; main then KL
    for KTO): an example gets (its first-half value, its second-half value), the second None when
    the batch has a single half. The values do not depend on batch composition, so they hold
    whatever batches the loader forms later.
    """
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk).items()}
        values = reference.sum_logps(batch, autocast=accelerator.autocast).float().cpu().tolist()
        n = len(chunk)
        second = values[n:] if len(values) == 2 * n else [None] * n
        for example, first, other in zip(chunk, values[:n], second):
            example.ref_logps = (first, other)
        if on_batch is not None:
            on_batch()
