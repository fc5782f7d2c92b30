"""The evaluator: item selection, the pass@k metric module, scores, a run end to end on a tiny model (resumed
after an interruption, re-scored), the Table 3 report, and the vLLM path against the stand-in engine."""

import json
from pathlib import Path

import pytest

from trl_resets.evaluation import (
    BENCHMARKS,
    GenerationSettings,
    RunSettings,
    evaluate_model,
    markdown_table,
    rescore,
    resolve_suite,
    select_items,
    summarize,
)
from trl_resets.evaluation import generation as gen
from trl_resets.evaluation.__main__ import main
from trl_resets.evaluation.suite import load_benchmark

from .conftest import make_tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"
PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--max-completion-tokens", "12", "--max-thought-tokens", "6", "--max-thoughts", "3"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def test_items_are_a_seeded_sample_capped_at_the_set_size():
    first = select_items(2000, 500, seed=0)
    assert len(first) == 500 == len(set(first)) and first == sorted(first) and max(first) < 2000
    assert select_items(2000, 500, seed=0) == first and select_items(2000, 500, seed=1) != first
    assert select_items(7, 500, seed=3) == list(range(7))
    with pytest.raises(ValueError, match="num_items=0"):
        select_items(7, 0, seed=0)


def test_suite_names_follow_table_3_and_unknown_names_are_refused():
    assert [b.column for b in resolve_suite(["paper"])] == ["oly", "hmmt", "lvl5", "stra", "ace", "chem", "bio",
                                                           "csqa", "mat", "phys"]
    assert [b.name for b in resolve_suite(["livecodebench", "paper"])][:2] == ["livecodebench", "numinamath_olympiads"]
    assert len(resolve_suite(["all"])) == 11
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        resolve_suite(["mmlu"])
    with pytest.raises(FileNotFoundError, match="strategyqa.jsonl"):
        load_benchmark(BENCHMARKS["strategyqa"], FIXTURES / "missing")


def test_pass_at_k_metric_module():
    records = [{"id": "a", "score": s} for s in (1.0, 0.0, 0.0, 1.0)]
    records += [{"id": "b", "score": s} for s in (0.5, 0.5, 0.0, 0.0)]
    records += [{"id": "c", "score": s} for s in (1.0, None, 1.0, 1.0)]  # an unscorable sample: item left out
    result = summarize(records, ks=[1, 2, 4])
    assert result["items"] == 2 and result["unscored_items"] == 1
    assert result["accuracy"] == pytest.approx(0.25) and result["pass@1"] == pytest.approx(0.25)
    assert result["pass@2"] == pytest.approx((1 - 1 / 6) / 2)  # item a: 1 - C(2,2)/C(4,2); item b never passes
    assert result["pass@4"] == pytest.approx(0.5)
    assert result["mean_score"] == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples"):
        summarize(records, ks=[8])


class AnswerBook:
    """A completer that answers right for the questions it knows and wrong otherwise (and counts its work)."""

    def __init__(self, answers: dict, num_samples: int = 1):
        self.answers, self.num_samples, self.asked = answers, num_samples, []

    def complete(self, questions, answer_format="boxed"):
        self.asked += questions
        self.formats = getattr(self, "formats", []) + [answer_format]
        return [[f"so \\boxed{{{self.answers.get(q, 'nothing')}}}"] * self.num_samples for q in questions]


def test_scores_come_from_each_benchmark_reward_and_rescoring_reads_the_file(tmp_path):
    settings = RunSettings(model="scripted", benchmarks=["hmmt_nov_2025", "strategyqa", "commonsense_qa"],
                           data_dir=str(FIXTURES), label="book")
    rows = {name: list(load_benchmark(BENCHMARKS[name], FIXTURES)) for name in settings.benchmarks}
    answers = {rows["hmmt_nov_2025"][0]["prompt"]: rows["hmmt_nov_2025"][0]["answer"],
               rows["strategyqa"][0]["prompt"]: "Yes" if rows["strategyqa"][0]["answer"] else "No",
               rows["strategyqa"][1]["prompt"]: "Yes" if rows["strategyqa"][1]["answer"] else "No"}
    for row in rows["commonsense_qa"]:
        answers[row["prompt"]] = row["answer"]
    results = evaluate_model(settings, tmp_path, completer=AnswerBook(answers), progress=False)
    assert results["hmmt_nov_2025"]["accuracy"] == 0.5 and results["strategyqa"]["accuracy"] == 1.0
    assert results["commonsense_qa"]["accuracy"] == 1.0
    table = (tmp_path / "table.md").read_text()
    assert "| Method | hmmt | stra | csqa |" in table and "| book | 50.0 | 100.0 | 100.0 |" in table
    # edit a completion in the file: re-scoring reads it, with no model
    records = _records(tmp_path)
    for record in records:
        if record["benchmark"] == "strategyqa":
            record["completion"] = "\\boxed{maybe}"
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    again = rescore(tmp_path)
    assert again["strategyqa"]["accuracy"] == 0.0 and again["hmmt_nov_2025"]["accuracy"] == 0.5
    assert json.loads((tmp_path / "results.json").read_text())["results"]["strategyqa"]["accuracy"] == 0.0
    assert all(r["score"] == 0.0 for r in _records(tmp_path) if r["benchmark"] == "strategyqa")


def test_a_run_end_to_end_resumes_after_an_interruption(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "run"
    argv = ["run", "--model", tiny_model_dir, "--data-dir", str(FIXTURES), "--output-dir", str(out),
            "--benchmarks", "hmmt_nov_2025,strategyqa,livecodebench", "--batch-size", "1", "--no-progress", *SMALL]
    assert main(argv) == 0
    full = _records(out)
    assert [(r["benchmark"], r["sample"]) for r in full] == [("hmmt_nov_2025", 0)] * 2 + [("strategyqa", 0)] * 2 + [
        ("livecodebench", 0)] * 2  # the fixture's medium problems
    assert all(isinstance(r["completion"], str) and r["score"] == 0.0 for r in full)  # a random model
    assert (out / "results.png").read_bytes()[:8] == PNG
    assert (out / "table.md").read_text().startswith("| Method | hmmt | stra | lcb |")
    settings = json.loads((out / "run.json").read_text())
    assert settings["generation"]["temperature"] == 0.0 and settings["num_items"] == 500

    # interrupted after three items, while writing the fourth
    lines = (out / "completions.jsonl").read_text().splitlines(keepends=True)
    (out / "completions.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    asked = []
    real = gen.Completer.complete
    monkeypatch.setattr(gen.Completer, "complete", lambda self, qs, fmt=None: asked.extend(qs) or real(self, qs, fmt))
    assert main(argv) == 0
    assert len(asked) == 3  # only the missing items were generated
    assert sorted(map(json.dumps, _records(out))) == sorted(map(json.dumps, full))  # greedy: the same completions

    asked.clear()
    assert main(argv) == 0 and asked == []  # a finished run generates nothing
    assert main(["rescore", str(out)]) == 0 and asked == [] and _records(out) == full
    with pytest.raises(ValueError, match="other settings .*num_items"):
        main([*argv, "--num-items", "1"])


def test_settings_that_cannot_be_honoured_are_refused():
    with pytest.raises(ValueError, match="identical greedy completions"):
        GenerationSettings(num_samples=4)
    with pytest.raises(ValueError, match="each k must lie in 1..num_samples"):
        RunSettings(model="m", pass_k=[1, 4], generation=GenerationSettings(num_samples=2, temperature=0.7))
    with pytest.raises(ValueError, match="unknown placeholder"):
        GenerationSettings(template="{problem}")
    with pytest.raises(ValueError, match="backend='vllm' needs vLLM"):
        gen.choose_backend("vllm")


def test_report_gives_mean_and_sd_over_runs_and_bolds_the_best(tmp_path):
    def run(folder, label, values):
        folder.mkdir()
        results = {name: {"accuracy": v} for name, v in zip(["numinamath_olympiads", "strategyqa"], values)}
        (folder / "results.json").write_text(json.dumps({"label": label, "results": results}))
        return str(folder)

    specs = [f"SRPO={run(tmp_path / 's0', 'x', [0.25, 0.70])}", f"SRPO={run(tmp_path / 's1', 'y', [0.27, 0.80])}",
             run(tmp_path / "g0", "GRPO", [0.30, 0.60])]
    assert main(["report", "--output-dir", str(tmp_path / "table"), *specs]) == 0
    table = (tmp_path / "table" / "table.md").read_text()
    assert "| Method | oly | stra |" in table
    assert "| SRPO (2 runs) | 26.0 ± 1.4 | **75.0 ± 7.1** |" in table and "| GRPO | **30.0** | 60.0 |" in table
    assert (tmp_path / "table" / "results.png").read_bytes()[:8] == PNG
    assert "mean_score" in markdown_table({"a": [{"strategyqa": {"mean_score": 0.5}}]}, metric="mean_score")


def test_sampling_settings_reach_the_transformers_sampler(char_tokenizer):
    model = make_tiny_llama(char_tokenizer)
    greedy = gen.transformers_completer(model, char_tokenizer, GenerationSettings(max_completion_tokens=8))
    assert not greedy.sampler.generation_config.do_sample
    sampled = gen.transformers_completer(model, char_tokenizer, GenerationSettings(
        temperature=0.7, top_p=0.9, num_samples=3, max_completion_tokens=8))
    config = sampled.sampler.generation_config
    assert config.do_sample and config.temperature == 0.7 and config.top_p == 0.9
    samples = sampled.complete(["1+1?", "2+2?"])
    assert [len(s) for s in samples] == [3, 3] and len({*samples[0]}) > 1


def test_vllm_path_matches_transformers_with_an_adapter_merged(tmp_path, tiny_model_dir, char_tokenizer, monkeypatch):
    """Greedy completions through the vLLM stand-in equal transformers' (an adapter merged before the engine
    loads the model), and the adapter changes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from . import fake_vllm

    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    char_tokenizer.save_pretrained(adapter)
    settings = GenerationSettings(max_completion_tokens=12, max_thought_tokens=6)
    questions = ["What is 2+3?", "Name a colour."]
    loaded = []

    def factory(model, seed):
        loaded.append(model)
        return fake_vllm.FakeLLM(AutoModelForCausalLM.from_pretrained(model), char_tokenizer)

    by_vllm = gen.make_completer(tiny_model_dir, str(adapter), settings, llm_factory=factory).complete(questions)
    by_transformers = gen.make_completer(tiny_model_dir, str(adapter), settings, backend="transformers").complete(
        questions)
    plain = gen.make_completer(tiny_model_dir, None, settings, backend="transformers").complete(questions)
    assert by_vllm == by_transformers != plain
    assert loaded[0] != tiny_model_dir and not Path(loaded[0]).exists()  # a merged copy, removed after loading
    assert gen.make_completer(tiny_model_dir, None, settings, llm_factory=factory).complete(questions) == plain
    for name in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):  # an adapter saved by peft alone
        (adapter / name).unlink(missing_ok=True)
    assert gen.make_completer(tiny_model_dir, str(adapter), settings, backend="transformers").complete(
        questions) == by_transformers  # the model's tokenizer


def test_evaluate_caches_stay_out_of_the_user_cache(_caches_in_a_temporary_folder):
    import evaluate.config

    assert Path(evaluate.config.HF_MODULES_CACHE).is_relative_to(_caches_in_a_temporary_folder)
