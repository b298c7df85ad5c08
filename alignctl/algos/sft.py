"""SFT on the offline driver: token-level NLL over the trained tokens, via the lean log-prob path."""

from __future__ import annotations

from functools import partial
from typing import Dict, Tuple

import torch
from omegaconf import DictConfig

from alignctl.algos.padding_free import use_padding_free
from alignctl.data.collate import collate_packed, collate_sequences, flatten_packed, unpad_batch
from alignctl.data.load import load_rows
from alignctl.data.sft import build_sft_examples
from alignctl.errors import ConfigError
from alignctl.engine.offline import Metrics, PreparedData, RunResult, run_offline
from alignctl.models.logps import CausalLMWithLogps, TokenLogps, token_nll
from alignctl.models.policy import add_neftune_hook, build_policy


class SFTAlgorithm:
    token_level_loss = True  # the offline loop warns when the loss sits at ln(vocab)

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg  # the algo section, as every offline algorithm takes it (prepare_data reads job.algo)

    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData:
        cfg = job.algo
        if cfg.truncation_mode not in ("keep_start", "keep_end"):
            raise ConfigError(f"algo.truncation_mode={cfg.truncation_mode!r}: use keep_start or keep_end")
        raw = load_rows(job.dataset, seed=job.train.seed)
        train = build_sft_examples(raw.train, tokenizer, cfg, job.dataset.skip_invalid)
        eval_data = build_sft_examples(raw.eval, tokenizer, cfg, job.dataset.skip_invalid) if raw.eval else None
        collate = collate_packed if cfg.packing else collate_sequences
        notes = [("data", f"{raw.source} ({train.format}, {len(raw.train)} train rows"
                  + (f", {len(raw.eval)} eval rows)" if raw.eval else ")"))]
        if cfg.packing:
            notes.append(("packing", f"{len(raw.train)} examples into {len(train.examples)} rows of <= {cfg.max_length}"))
        if train.skipped:
            notes.append(("skipped rows", f"{train.skipped} (dataset.skip_invalid=true)"))
        return PreparedData(
            train=train.examples,
            eval=eval_data.examples if eval_data else None,
            collate=partial(collate, pad_token_id=tokenizer.pad_token_id),
            notes=notes,
            eval_origin=raw.eval_origin,
        )

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        policy = build_policy(job, tokenizer)
        if job.algo.neftune_noise_alpha:
            add_neftune_hook(policy, float(job.algo.neftune_noise_alpha))
        return CausalLMWithLogps(policy, chunk_size=job.train.logps_chunk_size)

    def setup(self, job, accelerator, model, data) -> None:
        self.accelerator = accelerator
        use_padding_free(job, data, model, convert=flatten_packed if job.algo.packing else unpad_batch)

    def compute_loss(self, model, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]:
        out = TokenLogps.from_dict(
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                labels=batch["labels"],
                position_ids=batch.get("position_ids"),
                cu_seq_lens=batch.get("cu_seq_lens"),
            )
        )
        loss = token_nll(out)
        processes = self.accelerator.num_processes
        if processes > 1:
            # Mean over the tokens of the global batch, not of this process's share: gradients (averaged
            # across processes) and the logged loss then equal a single process with the whole batch.
            global_tokens = self.accelerator.reduce(out.num_tokens.sum().detach().float(), reduction="sum")
            loss = -out.sum_logps.sum() / global_tokens.clamp(min=1) * processes
        return loss, {}

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model


def run_sft(job: DictConfig) -> RunResult:
    return run_offline(job, SFTAlgorithm(job.algo), title="sft")
