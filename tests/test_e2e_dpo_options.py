"""The DPO/CPO options of the current reference release end to end through the CLI (tiny, 2-6 steps):
several options per run to keep the suite fast."""

import json
import math
import shutil

import pytest

from alignctl.cli import main
from alignctl.tracking import read_metrics
from conftest import run_cli

QUICK = ["train.save_steps=0", "train.eval_steps=0", "train.logging_steps=1", "run.progress=false"]


def records(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def train(out, *extra, recipe="smoke/dpo", steps=2):
    assert main(["train", f"recipe={recipe}", f"train.max_steps={steps}", f"run.output_dir={out}", *QUICK, *extra]) == 0
    return records(out)


def test_mpo_parts_wpo_and_ld_dpo(tmp_path):
    """MPO's three weighted parts, each logged, with WPO weights and LD-DPO in one run."""
    rows = train(tmp_path / "free", "algo.loss_type=[sigmoid,bco_pair,sft]", "algo.loss_weights=[0.8,0.2,1.0]",
                 "algo.use_weighting=true", "algo.ld_alpha=0.5")
    for r in rows:
        parts = 0.8 * r["loss/sigmoid"] + 0.2 * r["loss/bco_pair"] + 1.0 * r["loss/sft"]
        assert r["loss"] == pytest.approx(parts, rel=1e-6)
    # WPO weights are < 1, so the first sigmoid part (policy == reference) is below log 2
    assert 0 < rows[0]["loss/sigmoid"] < math.log(2)
    # the padded path gives the same numbers as the padding-free one (per-token positions agree)
    padded = train(tmp_path / "padded", "algo.loss_type=[sigmoid,bco_pair,sft]", "algo.loss_weights=[0.8,0.2,1.0]",
                   "algo.use_weighting=true", "algo.ld_alpha=0.5", "algo.padding_free=false")
    assert [r["loss"] for r in padded] == pytest.approx([r["loss"] for r in rows], rel=1e-5)


def test_f_divergence_with_rpo_and_sigmoid_norm(tmp_path):
    rows = train(tmp_path / "js", "algo.loss_type=[sigmoid,sigmoid_norm]", "algo.f_divergence_type=js_divergence",
                 "algo.rpo_alpha=0.5")
    first = rows[0]  # policy == reference: every f'(1) score is equal, so both preference parts are log 2
    assert first["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss/sigmoid_norm"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss"] == pytest.approx(2 * math.log(2) + 0.5 * first["loss/sft"], rel=1e-6)
    for f in ("forward_kl", "alpha_divergence"):
        assert all(math.isfinite(r["loss"]) for r in train(tmp_path / f, f"algo.f_divergence_type={f}"))


@pytest.mark.parametrize("args, needle", [
    (["algo.loss_type=[sigmoid,bco_pair]", "algo.f_divergence_type=forward_kl"], "not bco_pair"),
    (["algo.loss_type=[sigmoid,sft]", "algo.loss_weights=[1.0]"], "1 weights for 2 loss types"),
    (["algo.loss_type=[sigmoid,sft]", "algo.rpo_alpha=1.0"], "already has sft"),
    (["algo.loss_type=aot", "algo.use_weighting=true"], "does not apply to aot"),
    (["algo.ld_alpha=1.5"], "algo.ld_alpha=1.5"),
    (["algo.sync_ref_model=true", "algo.precompute_ref_logps=true"], "precompute_ref_logps"),
    (["algo.router_aux_loss_coef=0.01"], "not a mixture-of-experts"),
    (["algo.truncation=middle"], "algo.truncation='middle'"),
])
def test_bad_option_values_are_one_clear_error(tmp_path, capsys, args, needle):
    assert main(["train", "recipe=smoke/dpo", "train.max_steps=1", f"run.output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the run directory is written


def test_tr_dpo_sync_survives_resume_exactly(tmp_path):
    args = ["algo.sync_ref_model=true", "algo.ref_model_sync_steps=1", "algo.ref_model_mixup_alpha=0.6",
            "train.save_steps=3", "train.lr=1e-2"]
    whole = tmp_path / "whole"
    rows = train(whole, *args, steps=6)
    # step 1: reference == policy, so the loss is log 2; after syncs it is not
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (whole / "checkpoints" / "step-0000003" / "model" / "tr_dpo_reference.safetensors").is_file()

    resumed = tmp_path / "resumed"  # the same run cut back to its step-3 checkpoint, then resumed
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "final_model")
    with open(resumed / "metrics.jsonl") as f:
        kept = [line for line in f if json.loads(line)["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("".join(kept))
    assert main(["train", "recipe=smoke/dpo", "train.max_steps=6", f"run.output_dir={resumed}", *QUICK, *args,
                 "resume=auto"]) == 0
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in rows]

    # without the synced reference the checkpoint cannot continue this run: one clear error
    (resumed / "checkpoints" / "step-0000003" / "model" / "tr_dpo_reference.safetensors").unlink()
    shutil.rmtree(resumed / "final_model")
    result = run_cli("train", "recipe=smoke/dpo", "train.max_steps=6", f"run.output_dir={resumed}", *QUICK, *args,
                     f"resume={resumed / 'checkpoints' / 'step-0000003'}")
    assert result.returncode != 0 and "tr_dpo_reference.safetensors" in result.stderr


def test_cpo_alphapo_and_data_options(tmp_path):
    rows = train(tmp_path / "cpo", "algo.alpha=0.5", "algo.add_bos_to_prompt=false", "algo.truncation=joined",
                 recipe="smoke/cpo")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["rewards/chosen"] < 0 for r in rows)  # beta * (1 - p^-alpha) / alpha < 0 for p < 1
    # too-long pairs: the two truncations train different tokens (answers: prompt cut to 8, answers to
    # 20 - 8; joined: the whole prompt, answers to 20 - len(prompt))
    short = ["algo.max_length=20", "algo.max_prompt_length=8"]
    answers = train(tmp_path / "answers", *short, steps=1)
    joined = train(tmp_path / "joined", *short, "algo.truncation=joined", steps=1)
    assert answers[0]["logps/chosen"] != joined[0]["logps/chosen"]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, tiny_tokenizer):
    """A tiny Mixtral (4 experts, top-2) saved with the tiny tokenizer."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = tmp_path_factory.mktemp("tiny_moe")
    config = MixtralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, router_aux_loss_coef=0.02,
                           pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                           eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_router_aux_loss_of_a_mixture_of_experts_model(tmp_path, tiny_moe):
    model = [f"model.name_or_path={tiny_moe}", "model.arch=null"]
    dpo = train(tmp_path / "dpo", *model)  # null: the model config's 0.02 (DPO)
    assert all(r["aux_loss"] > 0 for r in dpo)
    off = train(tmp_path / "off", *model, "algo.router_aux_loss_coef=0")
    assert "aux_loss" not in off[0] and off[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # the same first batch from the same weights: the DPO part is equal, plus 0.02 x the router loss
    assert dpo[0]["loss"] == pytest.approx(off[0]["loss"] + 0.02 * dpo[0]["aux_loss"], rel=1e-6)
    orpo = train(tmp_path / "orpo", *model, "algo.router_aux_loss_coef=0.5", recipe="smoke/orpo")
    assert all(r["aux_loss"] > 0 for r in orpo)


def test_wpo_term_and_router_loss_match_the_full_forward(tiny_moe):
    """log sum_v p(v)^2 and the router loss of the chunked path equal those of the model's own forward."""
    import torch
    from transformers import MixtralForCausalLM

    from alignctl.models.logps import sequence_logps

    model = MixtralForCausalLM.from_pretrained(tiny_moe).eval()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    with torch.no_grad():
        out = sequence_logps(model, ids, mask, labels, log_sum_sq=True, router_aux=True, chunk_size=4)
        full = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    log_sum_sq = torch.logsumexp(2 * full.logits.float().log_softmax(-1), -1)[:, :-1]
    want = (log_sum_sq * (labels[:, 1:] != -100)).sum(-1)
    assert torch.allclose(out.log_sum_sq, want, atol=1e-5)
    assert out.aux_loss.item() == pytest.approx(full.aux_loss.item(), rel=1e-6)
