"""The format warm-up: its SFT data is exactly what the trainer shows the model, and the cache works."""

import random

import pytest
from datasets import Dataset

from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.app.warmup import (
    MARKER_FILE,
    WarmupSettings,
    inject_error,
    is_warmed_up,
    warm_up,
    warmup_dataset,
    warmup_key,
    warmup_path,
)
from trl_resets.localizers import LocalizationRequest, localization_prompt, parse_step_index
from trl_resets.tasks import check_steps, make_arithmetic_dataset, parse_equations
from trl_resets.thoughts import STOP_ANSWER, ThoughtFormat, segment_thoughts, strip_delimiter

from .conftest import make_tiny_llama


def _rows(n=12, steps=(2, 3, 4), seed=5):
    return make_arithmetic_dataset(n, num_steps=list(steps), seed=seed)


def test_rollout_prompt_is_the_trainers_prompt(tmp_path, char_tokenizer):
    data = warmup_dataset(WarmupSettings(num_rollout_examples=4, num_localization_examples=0))
    questions = make_arithmetic_dataset(4, num_steps=[2, 3], seed=WarmupSettings().seed, operations=("+", "-"))
    args = SRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=24,
                      use_cpu=True, bf16=False, report_to="none")
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=lambda completions, **kw: [0.0] * len(
        completions), args=args, train_dataset=Dataset.from_dict({"prompt": ["q"], "answer": ["1"]}),
        processing_class=char_tokenizer)
    by_question = {row["prompt"]: row for row in questions}
    for example in data:
        question = next(q for q in by_question if example["prompt"][0]["content"].endswith(q))
        raw = [{"role": "user", "content": question}]
        trainer_ids = trainer._tokenize_prompts([trainer._wrap(raw)])[0][0]
        sft_ids = char_tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True,
                                                     return_dict=True)["input_ids"]
        assert list(trainer_ids) == list(sft_ids)


def test_rollout_completion_is_the_reference_in_thoughts(char_tokenizer):
    settings = WarmupSettings(num_rollout_examples=16, num_localization_examples=0, num_steps=(2, 3, 4))
    data = warmup_dataset(settings)
    rows = {r["prompt"]: r for r in make_arithmetic_dataset(16, num_steps=[2, 3, 4], seed=settings.seed,
                                                            operations=("+", "-"))}
    fmt = ThoughtFormat(max_thoughts=20, max_thought_tokens=200)
    for example in data:
        assert example["kind"] == "rollout"
        row = next(r for q, r in rows.items() if example["prompt"][0]["content"].endswith(q))
        text = example["completion"][0]["content"]
        ids = char_tokenizer(text, add_special_tokens=False)["input_ids"]
        rollout = segment_thoughts(ids, char_tokenizer.decode, fmt)
        thoughts = [char_tokenizer.decode(rollout.thought_ids(h)) for h in range(rollout.num_thoughts)]
        # the trainer's own segmentation finds one thought per step, each closed by </thought>,
        # and stops on the boxed answer in the last one
        assert rollout.num_thoughts == row["num_steps"] and rollout.stop_reason == STOP_ANSWER
        assert all(t.rstrip().endswith("</thought>") for t in thoughts)
        check = check_steps(row, [strip_delimiter(t, fmt) for t in thoughts])
        assert check.first_wrong is None and check.final_correct


def test_injected_error_is_carried_forward_and_labelled_by_the_checker():
    rng = random.Random(0)
    seen = set()
    for row in _rows(40):
        thoughts, label = inject_error(row, rng)
        seen.add(label)
        check = check_steps(row, thoughts)
        assert label == check.first_wrong and not check.final_correct
        assert len(thoughts) == row["num_steps"]
        # only the injected step is false arithmetic; later steps compute correctly on the wrong value
        false_steps = [i + 1 for i, t in enumerate(thoughts) for eq in parse_equations(t)
                       if _evaluate(eq) != eq.result]
        assert false_steps == [label]
    assert len(seen) >= 3  # the error lands at different steps


def _evaluate(eq):
    return {"+": eq.left + eq.right, "-": eq.left - eq.right, "*": eq.left * eq.right, "/": eq.left / eq.right}[eq.op]


def test_localization_examples_use_the_localization_prompt_and_parse():
    data = warmup_dataset(WarmupSettings(num_rollout_examples=4, num_localization_examples=20))
    loc = [e for e in data if e["kind"] == "localization"]
    assert len(loc) == 20 and len(data) == 24
    for example in loc:
        prompt = example["prompt"][0]["content"]
        steps = [line.split(": ", 1)[1] for line in prompt.splitlines() if line.startswith("Step ")]
        question = prompt.split("Problem: ", 1)[1].split("\n", 1)[0]
        assert prompt == localization_prompt(LocalizationRequest(question, steps))
        reply = example["completion"][0]["content"]
        assert parse_step_index(reply, len(steps)) == example["target"]


def test_warmup_data_is_seeded():
    a = warmup_dataset(WarmupSettings(num_rollout_examples=6, num_localization_examples=6))
    b = warmup_dataset(WarmupSettings(num_rollout_examples=6, num_localization_examples=6))
    c = warmup_dataset(WarmupSettings(num_rollout_examples=6, num_localization_examples=6, seed=7))
    assert a.to_list() == b.to_list() and a.to_list() != c.to_list()


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="at least one example"):
        WarmupSettings(num_rollout_examples=0, num_localization_examples=0)
    with pytest.raises(ValueError, match="2 or more steps"):
        WarmupSettings(num_steps=(1,))
    with pytest.raises(ValueError, match="learning_rate"):
        WarmupSettings(learning_rate=0.0)
    with pytest.raises(ValueError, match="2 or more steps"):
        inject_error(make_arithmetic_dataset(1, num_steps=1)[0], random.Random(0))


def test_warm_up_trains_merges_caches_and_skips(tmp_path, char_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from trl_resets.app import warmup

    base = tmp_path / "base"
    model = make_tiny_llama(char_tokenizer)
    model.save_pretrained(base)
    char_tokenizer.save_pretrained(base)
    settings = WarmupSettings(num_rollout_examples=8, num_localization_examples=0, epochs=1, batch_size=8,
                              lora_r=4, lora_alpha=8, max_length=1024)
    cache = tmp_path / "cache"
    path = warm_up(str(base), settings, cache_dir=cache, show_progress=False)
    assert path == str(warmup_path(str(base), settings, cache)) and is_warmed_up(path)
    assert (tmp_path / "cache" / "warmup").is_dir() and not [p for p in (cache / "warmup").iterdir()
                                                              if p.name.startswith(".")]  # no temp folder left
    warmed = AutoModelForCausalLM.from_pretrained(path)
    assert not any("lora" in name for name, _ in warmed.named_parameters())  # adapter merged away
    changed = [n for n, p in warmed.named_parameters() if not (p == model.get_parameter(n)).all()]
    assert changed  # the merged weights differ from the base
    assert '"steps": 1' in (warmup_path(str(base), settings, cache) / MARKER_FILE).read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached warm-up must not train again")

    monkeypatch.setattr(warmup, "_train", no_training)
    assert warm_up(str(base), settings, cache_dir=cache) == path
    other = WarmupSettings(num_rollout_examples=8, num_localization_examples=0, epochs=1, lora_r=4, lora_alpha=8,
                           max_length=1024, learning_rate=5e-4)
    assert warmup_path(str(base), other, cache) != warmup_path(str(base), settings, cache)
    with pytest.raises(AssertionError, match="must not train"):
        warm_up(str(base), settings, cache_dir=cache, force=True)
    assert is_warmed_up(path)  # a failed retraining leaves the cached model in place


def test_cache_key_follows_the_weights_contents_not_their_sizes(tmp_path, char_tokenizer):
    base = tmp_path / "base"
    make_tiny_llama(char_tokenizer, seed=0).save_pretrained(base)
    char_tokenizer.save_pretrained(base)
    settings = WarmupSettings()
    first = warmup_key(str(base), settings)
    assert warmup_key(str(base), settings) == first
    (base / "README.md").write_text("a model card does not change the model")
    assert warmup_key(str(base), settings) == first
    sizes = sorted((p.name, p.stat().st_size) for p in base.iterdir() if p.suffix == ".safetensors")
    make_tiny_llama(char_tokenizer, seed=1).save_pretrained(base)  # other weights, same shapes, same path
    assert sorted((p.name, p.stat().st_size) for p in base.iterdir() if p.suffix == ".safetensors") == sizes
    assert warmup_key(str(base), settings) != first
