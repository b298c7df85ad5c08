"""Using a trained model: plain transformers/peft loading of every saved kind, generate, chat,
eval (equal to the training loop's eval numbers) and merge."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from alignctl.cli import main
from alignctl.tracking import read_metrics
from conftest import ROOT, run_cli

QUICK = ["train.eval_steps=0", "train.logging_steps=1", "run.progress=false", "run.sample_prompts=0"]


def train(out, *overrides):
    assert main(["train", *overrides, f"run.output_dir={out}", *QUICK]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    full = train(root / "full", "recipe=smoke/dpo", "train.max_steps=2", "train.save_steps=0")
    # lr high enough that the adapter moves the logits visibly; a checkpoint at step 2 (adapter + base)
    lora = train(root / "lora", "recipe=smoke/dpo", "peft=lora", "train.max_steps=3", "train.lr=1e-2",
                 "train.save_steps=2", "peft.merge_on_save=true")
    local = train(root / "local", "recipe=smoke/sft", "model.arch=null", f"model.name_or_path={full / 'final_model'}",
                  "peft=lora", "train.max_steps=1", "train.save_steps=0")
    reward = train(root / "reward", "recipe=smoke/reward", "peft=lora", "train.max_steps=2", "train.save_steps=0")
    # reference log-probs precomputed with the starting policy: eval must use the start, not the trained weights
    pre = train(root / "pre", "recipe=smoke/dpo", "train.max_steps=2", "train.save_steps=0", "train.lr=1e-2",
                "algo.precompute_ref_logps=true")
    return {"full": full, "lora": lora, "local": local, "reward": reward, "pre": pre}


def adapter_config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


def test_adapters_record_their_base(runs):
    tiny = runs["lora"] / "final_model"
    assert adapter_config(tiny)["base_model_name_or_path"] == str((tiny / "base").resolve())
    checkpoint = next((runs["lora"] / "checkpoints").iterdir()) / "model"
    assert adapter_config(checkpoint)["base_model_name_or_path"] == str((checkpoint / "base").resolve())
    local = runs["local"] / "final_model"
    assert adapter_config(local)["base_model_name_or_path"] == str((runs["full"] / "final_model").resolve())
    assert not (local / "base").exists()  # a loadable base is named, not copied
    reward = runs["reward"] / "final_model"  # a one-output classifier differs from any hub config: saved
    assert adapter_config(reward)["base_model_name_or_path"] == str((reward / "base").resolve())


def test_the_saved_tiny_base_is_the_untrained_base(runs, tiny_tokenizer):
    from safetensors.torch import load_file

    from alignctl.config import ArchConfig
    from alignctl.models.tiny import build_tiny_model

    saved = load_file(str(runs["lora"] / "final_model" / "base" / "model.safetensors"))
    original = build_tiny_model(ArchConfig(), tiny_tokenizer).state_dict()
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)


def test_a_hub_base_is_recorded_by_its_id_and_revision(tmp_path, tiny_tokenizer):
    from alignctl.config import ArchConfig, ModelConfig, PeftConfig
    from alignctl.models.peft_wrap import wrap_lora
    from alignctl.models.policy import save_model
    from alignctl.models.tiny import build_tiny_model

    model = wrap_lora(build_tiny_model(ArchConfig(), tiny_tokenizer), PeftConfig(method="lora", r=2), False)
    hub = ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")
    save_model(model, tmp_path / "tmp", processors=[tiny_tokenizer], model_cfg=hub, final_folder=tmp_path / "final")
    recorded = adapter_config(tmp_path / "tmp")
    assert (recorded["base_model_name_or_path"], recorded["revision"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "main")
    assert not (tmp_path / "tmp" / "base").exists()


def test_every_saved_kind_loads_with_plain_transformers_and_peft(runs, tmp_path):
    """In a fresh process, from another folder, offline: full, adapter on tiny (both peft ways),
    adapter on a local base, merged, reward adapter."""
    script = textwrap.dedent(
        """
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig, PeftModel
        full, lora, local, reward = sys.argv[1:5]
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        out = {}
        def logits(model):
            with torch.no_grad():
                return model.eval()(ids).logits
        out["full"] = logits(AutoModelForCausalLM.from_pretrained(full)).shape[-1]
        auto = AutoPeftModelForCausalLM.from_pretrained(lora)
        config = PeftConfig.from_pretrained(lora)
        explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path), lora)
        merged = AutoModelForCausalLM.from_pretrained(lora + "/merged")
        with auto.disable_adapter():
            base = logits(auto)
        out["adapter_vs_explicit"] = (logits(auto) - logits(explicit)).abs().max().item()
        out["adapter_vs_merged"] = (logits(auto) - logits(merged)).abs().max().item()
        out["adapter_vs_base"] = (logits(auto) - base).abs().max().item()
        out["local"] = logits(AutoPeftModelForCausalLM.from_pretrained(local)).shape[-1]
        scores = AutoPeftModelForSequenceClassification.from_pretrained(reward).eval()
        out["reward"] = list(scores(ids).logits.shape)
        out["chat"] = AutoTokenizer.from_pretrained(lora).apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        print(json.dumps(out))
        """
    )
    folders = [str(runs[name] / "final_model") for name in ("full", "lora", "local", "reward")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script, *folders], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["full"] == out["local"] > 0
    assert out["adapter_vs_explicit"] < 1e-6 and out["adapter_vs_merged"] < 1e-4
    assert out["adapter_vs_base"] > 1e-3  # the adapter is not a no-op, so the comparisons above mean something
    assert out["reward"] == [1, 1]
    assert out["chat"].endswith("<|im_start|>assistant\n")


def last_eval(run_dir):
    return [r for r in read_metrics(run_dir) if r.get("split") == "eval"][-1]


@pytest.mark.parametrize("name", ["full", "lora", "local", "reward", "pre"])
def test_eval_equals_the_training_loops_eval(runs, name, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(runs[name]), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = last_eval(runs[name])
    for key, value in expected.items():
        if key not in ("step", "split", "timestamp"):
            assert result["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    summary = result["summary"]
    if name == "local":  # an SFT run: perplexity of the loop's eval loss
        assert summary["perplexity"] == pytest.approx(2.718281828 ** expected["loss"], rel=1e-5)
    elif name == "reward":
        assert summary["pairwise accuracy"] == pytest.approx(expected["accuracy"])
    else:
        assert summary["preference accuracy"] == pytest.approx(expected["rewards/accuracies"])
        assert summary["mean margin"] == pytest.approx(expected["rewards/margins"], rel=1e-5)


def test_eval_default_output_and_overrides(runs):
    assert main(["eval", str(runs["full"]), "algo.beta=0.2"]) == 0
    result = json.loads((runs["full"] / "eval" / "smoke_pref.json").read_text())
    base = last_eval(runs["full"])
    assert result["metrics"]["rewards/margins"] == pytest.approx(2 * base["rewards/margins"], rel=1e-4)


def test_eval_of_a_plain_model_folder_uses_summed_logps(runs, tmp_path):
    out = tmp_path / "plain.json"
    assert main(["eval", str(runs["lora"] / "final_model" / "merged"), "dataset=smoke_pref", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["reference"].startswith("none")
    assert result["summary"]["mean log-prob margin"] == pytest.approx(metrics["logps/chosen"] - metrics["logps/rejected"])
    assert result["rows"].startswith("40 ")  # no eval split: every row


def test_generate_end_to_end(runs, capsys):
    args = ["generate", str(runs["lora"]), "Hello there", "What is 2+2?", "generation.max_new_tokens=5",
            "generation.do_sample=false"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "### 1: Hello there" and any(line == "### 2: What is 2+2?" for line in lines)
    assert main(args) == 0
    assert capsys.readouterr().out == result.stdout  # greedy: the same answers


def test_generate_uses_the_latest_checkpoint_without_a_final_model(runs, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["lora"], copy, ignore=shutil.ignore_patterns("final_model"))
    from alignctl.tools.resolve import resolve

    saved = resolve(str(copy))
    assert saved.kind == "adapter" and saved.folder.parent.name.startswith("step-")
    assert main(["generate", str(copy), "hi", "generation.max_new_tokens=3", "--seed", "0"]) == 0


def test_chat_keeps_history_and_ends_on_exit(runs):
    env = dict(os.environ, COLUMNS="200")
    result = subprocess.run(
        [sys.executable, "-m", "alignctl.cli", "chat", str(runs["full"]), "generation.max_new_tokens=4"],
        input="hello\nand again\n/exit\nnot read\n", capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2


def test_chat_history_is_rendered_with_the_template(tiny_tokenizer):
    from alignctl.tools.generate import fit_history, render

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "how are you"}]
    text = tiny_tokenizer.decode(render(history, tiny_tokenizer))
    assert text.count("<|im_start|>user") == 2 and text.endswith("<|im_start|>assistant\n")
    short = list(history)
    ids, dropped = fit_history(short, tiny_tokenizer, budget=len(render(history[2:], tiny_tokenizer)))
    assert dropped == 2 and short == history[2:]
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    assert plain.decode(render(history, plain, transcript=True)) == "User: hi\nAssistant: hello\nUser: how are you\nAssistant:"
    assert plain.decode(render(history[-1:], plain)) == "how are you"  # generate: the text as is
    # a templated prompt is tokenized as training does: the template's text, no BOS put in front
    with_bos = copy.deepcopy(tiny_tokenizer)
    with_bos.bos_token = "<|endoftext|>"
    assert render(history, with_bos) == with_bos(with_bos.apply_chat_template(
        history, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert render(history[-1:], with_bos, raw=True)[0] == with_bos.bos_token_id  # a raw text prompt keeps it


def test_merge_writes_a_plain_model_with_the_adapters_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignctl.tools.resolve import load_model, load_tokenizer, resolve

    out = tmp_path / "merged"
    assert main(["merge", str(runs["lora"]), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    saved = resolve(str(runs["lora"]))
    adapter = load_model(saved, load_tokenizer(saved))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-5)
        with adapter.disable_adapter():
            assert not torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-3)
    assert main(["merge", str(runs["lora"]), "--out", str(out)]) == 2  # never over an existing model


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "/no/such/run", "hi"], "no such file or directory"),
        (["generate", "{full}"], "give a prompt"),
        (["generate", "{full}", "hi", "train.lr=1"], "only generation.* settings"),
        (["generate", "{full}", "hi", "generation.temperature=0"], "generation.temperature=0"),
        (["generate", "{reward}", "hi"], "is a reward model"),
        (["generate", "unknown-org/unknown-model", "hi"], "hub cannot be reached"),
        (["chat", "{full}", "--bogus"], "unknown option --bogus"),
        (["eval", "{empty}"], "holds no model yet"),
        (["eval", "{full}/final_model/model.safetensors"], "is a file"),
        (["eval", "{lora}/final_model/merged"], "dataset=PRESET"),
        (["eval", "{full}", "dataset=smoke_kto"], "unpaired (KTO) set"),
        (["eval", "{reward}", "dataset=smoke_sft"], "is a reward model"),
        (["eval", "{full}", "algo.bogus=1"], "algo.bogus"),
        (["merge", "{full}"], "not a LoRA adapter"),
        (["merge", "{empty}"], "holds no model yet"),
    ],
)
def test_bad_inputs_are_one_clear_line(runs, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text('{"run_id": null}')
    paths = {"full": runs["full"], "reward": runs["reward"], "lora": runs["lora"], "empty": empty}
    args = [a.format(**paths) for a in args]
    assert main(args) == 2
    captured = capsys.readouterr()
    text = " ".join((captured.err + captured.out).split())
    assert message in text, text


def test_a_gguf_file_is_named_by_path_or_by_folder_and_model_gguf_file(tmp_path):
    from alignctl.errors import ModelLoadError
    from alignctl.tools.resolve import resolve, resolve_args

    (tmp_path / "m.Q4.gguf").write_bytes(b"")
    saved, rest = resolve_args(str(tmp_path), ["model.gguf_file=m.Q4.gguf", "generation.top_k=3"])
    assert (saved.kind, saved.folder, saved.gguf_file, rest) == ("gguf", tmp_path.resolve(), "m.Q4.gguf", ["generation.top_k=3"])
    assert resolve(str(tmp_path / "m.Q4.gguf")).gguf_file == "m.Q4.gguf"
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_args(str(tmp_path), ["model.gguf_file=other.gguf"])


def test_loading_a_run_keeps_its_remote_code_consent_and_revision(tmp_path, monkeypatch):
    """generate/chat/merge/eval load a run's model with the settings training used."""
    from omegaconf import OmegaConf

    import alignctl.models.load as load
    from alignctl.tools import resolve as tool

    calls = []

    def fake_from_pretrained(auto_cls, source, kwargs, what, key=None):
        calls.append((what, source, dict(kwargs)))
        raise RuntimeError("stop")

    monkeypatch.setattr(load, "_from_pretrained", fake_from_pretrained)
    run = OmegaConf.create({"model": {"name_or_path": "org/custom", "revision": "v2", "trust_remote_code": True,
                                      "attn_implementation": "eager"}})
    (tmp_path / "tokenizer.json").write_text("{}")
    full = tool.SavedModel("x", tmp_path, "full", run_config=run)
    for step in (lambda: tool.load_tokenizer(full), lambda: tool._load_plain(str(tmp_path), tool._model_kwargs(full),
                                                                              False, key=tool.ARG)):
        with pytest.raises(RuntimeError):
            step()
    assert calls[0][2] == {"trust_remote_code": True}
    assert calls[1][2] == {"dtype": "float32", "trust_remote_code": True}  # the kernel: this machine's default
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/custom"}))
    adapter = tool.SavedModel("x", tmp_path, "adapter", run_config=run)
    with pytest.raises(RuntimeError):
        tool.base_model(adapter, None)
    assert calls[2][1:] == ("org/custom", {"dtype": "float32", "trust_remote_code": True, "revision": "v2"})
    plain = tool.SavedModel("x", tmp_path, "full")  # no run config: safe defaults
    assert tool._model_kwargs(plain) == {"dtype": "float32"}


def test_eval_reads_saved_full_weights_without_building_a_second_model(runs, tmp_path, monkeypatch):
    import alignctl.tools.evaluate as evaluate

    def no_second_model(*args, **kwargs):
        raise AssertionError("eval built a second model to read the saved weights")

    monkeypatch.setattr(evaluate, "load_model", no_second_model)
    out = tmp_path / "eval.json"
    assert main(["eval", str(runs["full"]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["loss"] == pytest.approx(last_eval(runs["full"])["loss"], rel=1e-5)


def test_a_tied_parameter_saved_once_is_not_missing():
    from alignctl.tools.evaluate import _key_mismatch

    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 3), "head": torch.nn.Linear(3, 5, bias=False)})
    model["head"].weight = model["embed"].weight  # tied, as lm_head and the embeddings
    saved = {"embed.weight": torch.zeros(5, 3)}
    assert _key_mismatch(model, saved) == ([], [])
    model["head"].weight = torch.nn.Parameter(torch.zeros(5, 3))  # untied: now it is missing
    assert _key_mismatch(model, {**saved, "extra": torch.zeros(1)}) == (["head.weight"], ["extra"])


def test_eval_learns_the_columns_from_the_start_of_the_file(tmp_path, monkeypatch):
    """Which metrics a data set gets is read from its first row, after dataset.columns renames;
    the file is not read whole for it."""
    from alignctl.compose import compose_job
    from alignctl.data import load
    from alignctl.tools.evaluate import _family
    from alignctl.tools.resolve import SavedModel

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"question": "q", "good": "a", "bad": "b"}\n' + "{broken\n")  # only the first line is read
    job = compose_job(["algo=sft", "dataset=smoke_pref", f"dataset.path={data}", "dataset.columns.prompt=question",
                       "dataset.columns.chosen=good", "dataset.columns.rejected=bad"])
    monkeypatch.setattr(load, "load_rows", lambda *a, **k: pytest.fail("read the whole data set"))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    saved = SavedModel("m", tmp_path, "full")
    assert _family(saved, job, None, None) == "dpo"
    assert load.peek_split_columns(job.dataset, "train") == ["prompt", "chosen", "rejected"]


def test_every_offline_algorithm_is_built_from_the_registry():
    from alignctl.compose import compose_job
    from alignctl.registry import algorithms_where, get_algorithm

    for name in algorithms_where(loop="offline"):
        job = compose_job([f"algo={name}"])
        built = get_algorithm(name).build_offline(job.algo)
        assert hasattr(built, "compute_loss") and built.cfg is job.algo, name
    with pytest.raises(ValueError, match="no offline steps"):
        get_algorithm("ppo").build_offline(None)
