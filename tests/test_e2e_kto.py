"""KTO end to end: CLI smoke recipe, reference modes, unpaired data, metrics that never go NaN."""

import json
import math

import pytest

from alignctl.cli import main
from alignctl.tracking import read_metrics
from conftest import run_cli

KTO_METRICS = {
    "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
    "logits/chosen", "logits/rejected",
}
QUICK = ["train.save_steps=0", "train.eval_steps=0", "train.logging_steps=1", "run.progress=false"]


def records(run_dir, split="train"):
    return [r for r in read_metrics(run_dir) if r["split"] == split]


def kto_run(tmp_path, name, *extra, steps=4):
    out = tmp_path / name
    assert main(["train", "recipe=smoke/kto", f"train.max_steps={steps}", f"run.output_dir={out}", *QUICK, *extra]) == 0
    return records(out)


def all_finite(recs):
    return all(math.isfinite(v) for r in recs for v in r.values() if isinstance(v, float))


def test_kto_smoke_recipe_through_the_cli(tmp_path):
    result = run_cli("train", "recipe=smoke/kto", f"run.output_dir={tmp_path}", "train.logging_steps=1", "run.progress=false")
    assert result.returncode == 0, result.stderr
    assert "smoke_pref.jsonl (prompt_chosen_rejected -> unpaired" in result.stderr
    train, evals = records(tmp_path), records(tmp_path, "eval")
    assert len(train) == 30 and KTO_METRICS <= set(train[0]) and KTO_METRICS <= set(evals[-1])
    assert all_finite(train) and all_finite(evals)
    # policy == reference at the first step: every reward and the KL estimate are 0, each loss is 1 - sigmoid(0)
    first = train[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    # a separable set: the implicit reward of desirable completions ends above that of undesirable ones
    last = train[-5:]
    assert sum(r["rewards/chosen"] > r["rewards/rejected"] for r in last) == 5
    assert sum(r["rewards/margins"] for r in last) / 5 > 0.5
    assert evals[0]["rewards/margins"] > 0 and evals[-1]["rewards/chosen"] > evals[-1]["rewards/rejected"]
    assert evals[-1]["rewards/margins"] > evals[0]["rewards/margins"]  # step 15 -> step 30
    assert sum(r["loss"] for r in last) / 5 < first["loss"]
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


def test_precomputed_reference_matches_live_reference(tmp_path):
    live = kto_run(tmp_path, "live", "algo.precompute_ref_logps=false")
    pre = kto_run(tmp_path, "pre", "algo.precompute_ref_logps=true")
    assert pre[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        assert [r[key] for r in pre] == pytest.approx([r[key] for r in live], abs=1e-5), key
    assert max(r["kl"] for r in live) > 0  # the KL rows were used, and agree


def test_lora_uses_the_adapter_off_as_reference(tmp_path):
    train = kto_run(tmp_path, "lora", "peft=lora", "train.lr=1e-2")
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6) and train[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"]
    assert (tmp_path / "lora" / "final_model" / "adapter_model.safetensors").is_file()


def test_unpaired_smoke_kto_dataset(tmp_path):
    out = tmp_path / "unpaired"
    result = run_cli("train", "recipe=smoke/kto", "dataset=smoke_kto", "train.max_steps=6", "train.eval_steps=0",
                     "train.logging_steps=1", f"run.output_dir={out}", "run.progress=false")
    assert result.returncode == 0, result.stderr
    assert "prompt_completion_label" in result.stderr and "15 desirable + 14 undesirable" in result.stderr
    assert "recommended" not in result.stderr  # 15/14 is inside [1, 4/3]
    train, evals = records(out), records(out, "eval")
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6) and KTO_METRICS <= set(evals[-1])
    assert all_finite(train) and all_finite(evals)


def test_batches_of_one_and_apo_zero_never_log_nan(tmp_path):
    # every micro-batch holds one kind only: a window logs the kinds it saw, exactly, never NaN
    train = kto_run(tmp_path, "b1", "train.per_device_batch_size=1", "train.gradient_accumulation_steps=2", steps=3)
    assert all_finite(train)
    assert all("rewards/margins" not in r for r in train)  # no micro-batch held both kinds
    assert all(("rewards/chosen" in r) or ("rewards/rejected" in r) for r in train)
    apo = kto_run(tmp_path, "apo", "algo.loss_type=apo_zero_unpaired", steps=2)
    assert all_finite(apo) and all(r["kl"] == 0 for r in apo)


def test_chat_pairs_and_imbalance_warning_and_bad_labels(tmp_path):
    chat = kto_run(tmp_path, "chat", "dataset=smoke_pref_chat", steps=2)
    assert chat[0]["loss"] == pytest.approx(0.5, abs=1e-6)

    data = tmp_path / "skewed.jsonl"
    rows = [{"prompt": f"Question {i}?", "completion": " It is fine." if i < 6 else " No.", "label": i < 6} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("train", "recipe=smoke/kto", f"dataset.path={data}", "dataset.eval_fraction=0", "train.max_steps=1",
                     f"run.output_dir={tmp_path / 'skewed'}", *QUICK)
    assert result.returncode == 0, result.stderr
    assert "6 desirable / 2 undesirable" in result.stderr and "recommended [1, 4/3]" in result.stderr

    for row in rows:
        row["label"] = "yes" if row["label"] else "no"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("train", "recipe=smoke/kto", f"dataset.path={data}", "dataset.eval_fraction=0",
                     f"run.output_dir={tmp_path / 'bad'}", *QUICK)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "skewed.jsonl: row 0 (line 1): column 'label' must be true or false, got 'yes'" in result.stderr


def test_single_example_trains_without_kl_pairs(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "Capital of Peru?", "completion": " It is Lima.", "label": True}) + "\n")
    train = kto_run(tmp_path, "one", f"dataset.path={data}", "dataset.eval_fraction=0", steps=2)
    assert [r["kl"] for r in train] == [0.0, 0.0] and all_finite(train)


def test_unknown_loss_type_lists_valid_ones(tmp_path):
    result = run_cli("train", "recipe=smoke/kto", "algo.loss_type=sigmoid", f"run.output_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "algo.loss_type='sigmoid'" in result.stderr and "apo_zero_unpaired" in result.stderr


def test_kto_metrics_are_exact_means_over_the_window():
    import torch

    from alignctl.algos.kto import kto_metrics
    from alignctl.engine.window import MetricWindow
    from alignctl.losses.kto import KTOLossOutput
    from alignctl.models.logps import TokenLogps

    class OneProcess:
        device = torch.device("cpu")

        @staticmethod
        def reduce(tensor, reduction):
            return tensor

    window = MetricWindow()
    # micro-batch 1: two desirable (rewards 1, 3), micro-batch 2: one undesirable (reward -2) and one desirable (5)
    for labels, chosen, rejected in (([True, True], [1.0, 3.0], []), ([False, True], [5.0], [-2.0])):
        desirable = torch.tensor(labels)
        out = TokenLogps(sum_logps=torch.zeros(2), num_tokens=torch.ones(2, dtype=torch.long), logits_sum=torch.zeros(2))
        result = KTOLossOutput(torch.zeros(2), torch.tensor(chosen), torch.tensor(rejected), torch.zeros(()))
        window.add(torch.zeros(()), kto_metrics(result, out, desirable), torch.tensor(4))
    record, _ = window.flush(OneProcess())
    assert record["rewards/chosen"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3, not the mean of batch means (3.5)
    assert record["rewards/rejected"] == pytest.approx(-2.0)  # one micro-batch had none: not diluted
    assert record["rewards/margins"] == pytest.approx(7.0)  # only the micro-batch holding both kinds
