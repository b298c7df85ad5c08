"""Python API for users with their own generation loop: the reference library's ``PPOTrainer.step``.

    from alignctl.api import PPOTrainer

    trainer = PPOTrainer(model=causal_lm, tokenizer=tokenizer, batch_size=8, mini_batch_size=4, learning_rate=1e-5)
    stats = trainer.step(queries, responses, scores)   # lists of 1-D tensors / scalars, one per sample
    stats["objective/kl"], stats["ppo/policy/clipfrac"], ...

It runs exactly what ``alignctl train algo=ppo`` runs after sampling and scoring (``PPOUpdate``):
old and reference log-probs and values, KL-penalised per-token rewards, GAE, ``ppo_epochs`` of
clipped updates, the KL controller. Hyperparameters are the fields of
``alignctl.algo_configs.PPOConfig`` (the reference's names), plus ``learning_rate``,
``max_grad_norm`` (None = no clipping) and ``seed``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from alignctl.algo_configs import PPOConfig
from alignctl.errors import ConfigError

# The reference's PPOConfig fields that are not algorithm settings of PPOConfig here.
TRAINING_FIELDS = {"learning_rate": 1.41e-5, "max_grad_norm": None, "seed": 0}


class PPOTrainer:
    def __init__(
        self,
        config: Optional[PPOConfig] = None,
        model: Optional[torch.nn.Module] = None,
        ref_model: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        temperature: float = 1.0,
        logps_chunk_size: int = 256,
        **settings: Any,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from alignctl.algos.ppo import PPOUpdate, check_ppo_config
        from alignctl.models.reference import ReferenceModel, disable_dropout, is_peft_model
        from alignctl.models.value_head import PolicyWithValue

        if model is None:
            raise ConfigError("PPOTrainer needs model= (a transformers causal LM, optionally with a LoRA adapter)")
        training = {**TRAINING_FIELDS, **{k: settings.pop(k) for k in list(settings) if k in TRAINING_FIELDS}}
        self.config = _with_overrides(config or PPOConfig(), settings)
        check_ppo_config(self.config)
        set_seed(training["seed"])
        self.tokenizer = tokenizer
        self.accelerator = Accelerator(gradient_accumulation_steps=self.config.gradient_accumulation_steps)

        if isinstance(model, PolicyWithValue):
            wrapped = model
        else:
            disable_dropout(model)
            wrapped = PolicyWithValue(model, temperature=temperature, chunk_size=logps_chunk_size, init_seed=training["seed"])
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            reference = ReferenceModel("copy", ref_model, chunk_size=logps_chunk_size)
        elif is_peft_model(wrapped.policy):
            reference = ReferenceModel("adapter", wrapped.policy, chunk_size=logps_chunk_size)
        else:
            frozen = copy.deepcopy(wrapped.policy).eval().requires_grad_(False)
            reference = ReferenceModel("copy", frozen, chunk_size=logps_chunk_size)
        if optimizer is None:
            params = [p for p in wrapped.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(params, lr=training["learning_rate"])
        self.model, self.optimizer = self.accelerator.prepare(wrapped, optimizer)
        reference.to(self.accelerator.device)
        self.update = PPOUpdate(
            self.config, self.accelerator, self.model, self.optimizer, reference,
            temperature=temperature, chunk_size=logps_chunk_size, max_grad_norm=training["max_grad_norm"] or 0.0,
        )

    @property
    def kl_ctl(self):
        return self.update.kl_ctl

    def step(
        self,
        queries: Sequence[torch.Tensor],
        responses: Sequence[torch.Tensor],
        scores: Sequence[Union[torch.Tensor, float]],
        response_masks: Optional[Sequence[torch.Tensor]] = None,
    ) -> Dict[str, float]:
        """One PPO update on ``batch_size`` samples: ``queries[i]`` and ``responses[i]`` are 1-D token
        tensors (no padding), ``scores[i]`` a scalar; ``response_masks[i]`` (optional) marks which
        response tokens are trained (1) or not (0). Returns the stats, as floats."""
        rollout = self._rollout(queries, responses, response_masks)
        raw = torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores])
        _, stats = self.update.step(rollout, raw.to(self.accelerator.device))
        return {key: float(value) for key, value in stats.items()}

    def _rollout(self, queries, responses, response_masks):
        from alignctl.data.collate import pad_right
        from alignctl.rollout.batch import Rollout
        from alignctl.rollout.generate import left_pad

        n = self.config.batch_size
        if not (len(queries) == len(responses) == n):
            raise ConfigError(
                f"step() got {len(queries)} queries and {len(responses)} responses; batch_size is {n}: pass "
                "batch_size of each (or build the trainer with batch_size=<your batch>)"
            )
        for name, seqs in (("queries", queries), ("responses", responses)):
            for i, seq in enumerate(seqs):
                if not isinstance(seq, torch.Tensor) or seq.dim() != 1 or seq.numel() == 0:
                    raise ConfigError(f"{name}[{i}] must be a non-empty 1-D tensor of token ids")
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        prompt_ids, prompt_mask = left_pad([q.tolist() for q in queries], pad)
        response_ids = pad_right([r.tolist() for r in responses], pad)
        lengths = pad_right([[1] * r.numel() for r in responses], 0)
        if response_masks is not None:
            given = pad_right([m.long().tolist() for m in response_masks], 0)
            if given.shape != lengths.shape:
                raise ConfigError("response_masks[i] must have the length of responses[i]")
            lengths = lengths * given
        rollout = Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=lengths,
            row_index=torch.arange(n), group_ids=torch.arange(n),
        )
        return rollout.to(self.accelerator.device)


def _with_overrides(config: PPOConfig, settings: Dict[str, Any]) -> PPOConfig:
    valid = {f.name for f in dataclasses.fields(PPOConfig)}
    unknown = sorted(set(settings) - valid)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {difflib.get_close_matches(k, valid, n=1)[0]}?)"
                 if difflib.get_close_matches(k, valid, n=1) else k for k in unknown]
        raise ConfigError(f"unknown PPO settings: {', '.join(hints)}; valid: {', '.join(sorted(valid | set(TRAINING_FIELDS)))}")
    return dataclasses.replace(config, **settings)


__all__: List[str] = ["PPOTrainer", "PPOConfig"]


class IterativeSFTTrainer:
    """The reference library's IterativeSFTTrainer: one SFT optimisation step per ``step`` call on
    examples from your own loop (e.g. the completions your sampler kept).

        trainer = IterativeSFTTrainer(model=causal_lm, tokenizer=tokenizer, learning_rate=1e-5, max_length=256)
        stats = trainer.step(texts=["Q: 2+2? A: 4"])                          # every token trained
        stats = trainer.step(texts=prompts, texts_labels=completions)        # completion tokens only
        stats = trainer.step(input_ids=ids, attention_mask=mask, labels=labels)

    ``texts_labels`` here are the completions that follow ``texts`` (prompts): the loss is on their
    tokens only. Token lists are cut to ``max_length`` (``truncation_mode`` keep_end keeps the end).
    The loss is the mean negative log-likelihood over trained tokens, via the memory-lean
    log-prob path; the returned stats are ``loss``, ``lr``, ``num_tokens`` and ``grad_norm``.
    """

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        learning_rate: float = 1e-5,
        max_length: Optional[int] = None,
        truncation_mode: str = "keep_end",
        max_grad_norm: Optional[float] = 1.0,
        logps_chunk_size: int = 256,
    ) -> None:
        from accelerate import Accelerator

        from alignctl.models.logps import CausalLMWithLogps

        if model is None or tokenizer is None:
            raise ConfigError("IterativeSFTTrainer needs model= (a transformers causal LM) and tokenizer=")
        if truncation_mode not in ("keep_end", "keep_start"):
            raise ConfigError(f"truncation_mode={truncation_mode!r}: use keep_end or keep_start")
        if max_length is not None and max_length < 1:
            raise ConfigError(f"max_length={max_length}: must be >= 1 (or None for no limit)")
        self.tokenizer, self.max_length, self.truncation_mode = tokenizer, max_length, truncation_mode
        self.max_grad_norm = max_grad_norm
        self.accelerator = Accelerator()
        wrapped = CausalLMWithLogps(model, chunk_size=logps_chunk_size)
        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=learning_rate)
        self.model, self.optimizer = self.accelerator.prepare(wrapped, optimizer)

    def step(
        self,
        input_ids: Optional[Sequence[torch.Tensor]] = None,
        attention_mask: Optional[Sequence[torch.Tensor]] = None,
        labels: Optional[Sequence[torch.Tensor]] = None,
        texts: Optional[Sequence[str]] = None,
        texts_labels: Optional[Sequence[str]] = None,
    ) -> Dict[str, float]:
        from alignctl.data.collate import pad_right
        from alignctl.data.encode import IGNORE_INDEX
        from alignctl.models.logps import TokenLogps, token_nll

        rows, row_labels = self._examples(input_ids, attention_mask, labels, texts, texts_labels)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch_ids = pad_right(rows, pad).to(self.accelerator.device)
        batch_mask = pad_right([[1] * len(r) for r in rows], 0).to(self.accelerator.device)
        batch_labels = pad_right(row_labels, IGNORE_INDEX).to(self.accelerator.device)
        self.model.train()
        out = TokenLogps.from_dict(self.model(input_ids=batch_ids, attention_mask=batch_mask, labels=batch_labels))
        loss = token_nll(out)
        self.accelerator.backward(loss)
        grad_norm = 0.0
        if self.max_grad_norm:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "lr": self.optimizer.param_groups[0]["lr"],
                "num_tokens": float(out.num_tokens.sum()), "grad_norm": grad_norm}

    def _examples(self, input_ids, attention_mask, labels, texts, texts_labels):
        """Token lists and their labels (-100 = no loss), cut to max_length."""
        from alignctl.data.encode import IGNORE_INDEX, encode_completion, encode_prompt, truncate

        if (input_ids is None) == (texts is None):
            raise ConfigError("step() takes either input_ids (with attention_mask/labels) or texts (with texts_labels)")
        if texts is not None:
            if not texts:
                raise ConfigError("step(texts=...) got no texts")
            if texts_labels is not None and len(texts_labels) != len(texts):
                raise ConfigError(f"step(): {len(texts)} texts but {len(texts_labels)} texts_labels; give one per text")
            rows, row_labels = [], []
            for i, text in enumerate(texts):
                prompt = encode_prompt(self.tokenizer, text)
                if texts_labels is None:
                    ids, lab = prompt, list(prompt)
                else:
                    completion = encode_completion(self.tokenizer, texts_labels[i], add_eos=True)
                    ids, lab = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
                rows.append(ids)
                row_labels.append(lab)
        else:
            if not input_ids:
                raise ConfigError("step(input_ids=...) got no sequences")
            rows, row_labels = [], []
            for i, ids in enumerate(input_ids):
                ids = torch.as_tensor(ids).reshape(-1)
                keep = torch.as_tensor(attention_mask[i]).reshape(-1).bool() if attention_mask is not None else None
                lab = torch.as_tensor(labels[i]).reshape(-1) if labels is not None else ids.clone()
                if lab.shape != ids.shape or (keep is not None and keep.shape != ids.shape):
                    raise ConfigError(f"step(): input_ids[{i}], attention_mask[{i}] and labels[{i}] must have one length")
                if keep is not None:
                    ids, lab = ids[keep], lab[keep]
                rows.append(ids.tolist())
                row_labels.append(lab.tolist())
        if self.max_length is not None:
            rows = [truncate(r, self.max_length, self.truncation_mode) for r in rows]
            row_labels = [truncate(r, self.max_length, self.truncation_mode) for r in row_labels]
        if not any(label != IGNORE_INDEX for r in row_labels for label in r[1:]):
            raise ConfigError("step(): no token carries loss after truncation; raise max_length or check the labels")
        return rows, row_labels


__all__ += ["IterativeSFTTrainer"]
