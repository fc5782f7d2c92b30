"""ValidationCallback: greedy held-out pass rate on the trainer's model, logged where every report_to logger
sees it (inside a TRL trainer's step line, or through a plain Trainer's log)."""

import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerControl, TrainingArguments

from tests.conftest import ScriptedLlama, make_tiny_llama
from tests.trainer.test_trainer import _args, _dataset
from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.evaluation.callback import ValidationCallback, _trainer_settings, paired_rise
from trl_resets.evaluation.generation import prompt_ids
from trl_resets.rewards import boxed_answer_reward


def _held_out(answers):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i}?"}] for i in range(len(answers))],
                              "answer": answers})


def _srpo_trainer(tmp_path, tok, scripts, held_out=None, **overrides):
    """An SRPO trainer on a scripted model; with ``held_out``, held-out row i follows ``scripts[i]`` whatever the
    validation's batching (the model knows each row by its rollout prompt)."""
    args = _args(tmp_path, SRPOConfig, max_thought_tokens=40, max_completion_length=40, **overrides)
    prompts = None if held_out is None else [prompt_ids(tok, q, _trainer_settings(args, None))
                                             for q in held_out["prompt"]]
    model = ScriptedLlama.build(tok, [tok(s, add_special_tokens=False)["input_ids"] for s in scripts], prompts)
    return SRPOTrainer(model=model, reward_funcs=boxed_answer_reward, args=args, train_dataset=_dataset(),
                       processing_class=tok)


def test_greedy_pass_rate_joins_the_step_line_of_a_trl_trainer(tmp_path, char_tokenizer):
    held_out = _held_out(["5", "7"])
    trainer = _srpo_trainer(tmp_path, char_tokenizer, ["so \\boxed{5}</thought>", "so \\boxed{3}</thought>"],
                            held_out)
    callback = ValidationCallback(trainer, held_out, boxed_answer_reward, every_steps=2)
    trainer.add_callback(callback)
    assert callback.settings.temperature == 0 and callback.settings.max_completion_tokens == 40
    trainer.model.train()
    callback.on_train_begin(trainer.args, trainer.state, TrainerControl())
    assert trainer.state.log_history[-1]["validation/pass_rate"] == 0.5  # row 0 answers 5 (right), row 1 3 (wrong)
    assert trainer.state.log_history[-1]["step"] == 0 and trainer.model.training  # train mode is restored

    trainer.state.global_step, trainer.state.max_steps = 1, 4
    control = TrainerControl()
    callback.on_step_end(trainer.args, trainer.state, control)
    assert not control.should_log and "validation/pass_rate" not in trainer._metrics["train"]  # not an eval step
    trainer.state.global_step = 2
    callback.on_step_end(trainer.args, trainer.state, control)
    assert control.should_log and trainer._metrics["train"]["validation/pass_rate"] == [0.5]
    assert trainer._metrics["train"]["validation/reward"] == [0.5]
    trainer.log({"loss": 1.0})  # the step's log line carries the values
    assert trainer.state.log_history[-1]["validation/pass_rate"] == 0.5 and trainer.state.log_history[-1]["step"] == 2
    assert [h["step"] for h in callback.history] == [0, 2]
    assert callback.passes == {0: [1.0, 0.0], 2: [1.0, 0.0]}  # per problem, in the held-out order
    assert callback.rise() == {"from_step": 0, "to_step": 2, "start": 0.5, "end": 0.5, "rise": 0.0, "se": 0.0,
                               "problems": 2}


def test_the_rise_is_the_mean_change_per_problem_with_its_paired_standard_error():
    first, last = [1, 0, 0, 1, 0], [1, 1, 1, 0, 0]  # changes 0, +1, +1, -1, 0
    rise = paired_rise(first, last)
    assert rise["start"] == 0.4 and rise["end"] == 0.6 and rise["rise"] == pytest.approx(0.2)
    # sample variance of the changes (0.08 + 0.64 * 2 + 1.44) / 4 = 0.7, over n = 5 problems
    assert rise["se"] == pytest.approx((0.7 / 5) ** 0.5) and rise["problems"] == 5
    assert paired_rise([1.0], [0.0])["se"] == 0.0
    with pytest.raises(ValueError, match="same problems twice"):
        paired_rise([1, 0], [1])


def test_a_plain_trainer_logs_validation_through_its_log(tmp_path, char_tokenizer):
    model = make_tiny_llama(char_tokenizer)
    ids = char_tokenizer("1+1=2", add_special_tokens=False)["input_ids"]
    train = Dataset.from_dict({"input_ids": [ids] * 4, "labels": [ids] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, save_strategy="no", logging_steps=10)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=char_tokenizer)
    callback = ValidationCallback(trainer, _held_out(["2", "4"]), boxed_answer_reward, every_steps=1,
                                  max_completion_tokens=8)
    trainer.add_callback(callback)
    trainer.train()
    logged = [(e["step"], e["validation/pass_rate"]) for e in trainer.state.log_history if "validation/pass_rate" in e]
    assert logged == [(0, 0.0), (1, 0.0), (2, 0.0)]  # a random model: no boxed answer


def test_settings_it_cannot_honour_are_refused(tmp_path, char_tokenizer):
    trainer = _srpo_trainer(tmp_path, char_tokenizer, ["\\boxed{1}"])
    with pytest.raises(ValueError, match="every_steps=0"):
        ValidationCallback(trainer, _held_out(["1"]), boxed_answer_reward, every_steps=0)
    with pytest.raises(ValueError, match="'prompt' column"):
        ValidationCallback(trainer, Dataset.from_dict({"question": ["q"]}), boxed_answer_reward, every_steps=1)
    zero3 = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(zero_stage=3))), args=trainer.args)
    fsdp = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace()), is_fsdp_enabled=True,
                           args=trainer.args)
    for sharded in (zero3, fsdp):
        with pytest.raises(ValueError, match="ZeRO-3 or FSDP"):
            ValidationCallback(sharded, _held_out(["1"]), boxed_answer_reward, every_steps=1)


def test_batched_validation_gives_the_unbatched_greedy_answers(tmp_path, char_tokenizer):
    model = make_tiny_llama(char_tokenizer, seed=3)
    with torch.no_grad():  # larger weights: the greedy answer depends on the question, not on the template only
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.mul_(10)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, processing_class=char_tokenizer)
    questions = ["1+1?", "12+30-7?", "5?", "100-1+2+3?", "7-3?"]  # different lengths: the batch is left-padded
    held_out = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions],
                                  "answer": ["2", "35", "5", "104", "4"]})
    seen = {}

    def recording_reward(completions, answer, **kwargs):
        seen.setdefault(batch, []).extend(completions)
        return [0.0] * len(completions)

    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    for batch in (1, 2, 5):
        callback = ValidationCallback(trainer, held_out, recording_reward, every_steps=1, max_completion_tokens=12,
                                      batch_size=batch)
        assert callback.settings.batch_size == batch
        widths.clear()
        callback.evaluate()
    hook.remove()
    assert len(seen[1]) == len(questions) and len(set(seen[1])) > 1  # distinct answers, not one repeated row
    assert seen[2] == seen[1] and seen[5] == seen[1]
    # the batched pass encoded the prompts' shared opening (chat template and instruction) once, for all 5 rows
    prompts = [prompt_ids(char_tokenizer, q, callback.settings) for q in held_out["prompt"]]
    opening = len(os.path.commonprefix(prompts))
    assert opening > 20 and widths[:2] == [(1, opening), (5, max(map(len, prompts)) - opening)]
    with pytest.raises(ValueError, match="batch_size=0"):
        ValidationCallback(trainer, held_out, recording_reward, every_steps=1, batch_size=0)


def test_each_validation_uses_the_adapter_of_its_step_in_eval_mode_and_the_last_one_answers_as_the_saved_adapter(
        tmp_path, char_tokenizer):
    """The adapter across a run: validation at step k decodes with the step-k adapter (merged, no dropout), and the
    last validation gives exactly the answers of the adapter the run saves, loaded afresh."""
    from peft import LoraConfig

    from trl_resets.evaluation.generation import load_transformers_model, transformers_completer

    base = make_tiny_llama(char_tokenizer, seed=3)
    with torch.no_grad():  # larger weights: the greedy answer depends on the question and on the adapter
        for name, weight in base.named_parameters():
            if "norm" not in name:
                weight.mul_(10)
    base.save_pretrained(tmp_path / "base")
    char_tokenizer.save_pretrained(tmp_path / "base")
    args = _args(tmp_path / "run", SRPOConfig, max_steps=2, learning_rate=0.3, max_thought_tokens=8,
                 max_completion_length=12)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, target_modules=["q_proj", "v_proj", "up_proj"])

    def length_reward(completions, **kwargs):  # rewards that differ within a group: every step moves the adapter
        return [len(c[0]["content"] if isinstance(c, list) else c) / 10 for c in completions]

    trainer = SRPOTrainer(model=str(tmp_path / "base"), reward_funcs=length_reward, args=args,
                          train_dataset=_dataset(conversational=True), processing_class=char_tokenizer,
                          peft_config=lora)
    questions = ["1+1?", "12+30-7?", "5?", "100-1+2+3?", "7-3?"]
    held_out = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
    answers = []

    def recording_reward(completions, **kwargs):
        answers.append(list(completions))
        return [0.0] * len(completions)

    callback = ValidationCallback(trainer, held_out, recording_reward, every_steps=1)
    trainer.add_callback(callback)
    trainer.train()
    assert [h["step"] for h in callback.history] == [0, 1, 2] and trainer.model.training
    assert answers[0] != answers[1] != answers[2]  # each step changed the greedy answers: steps can be told apart
    assert callback.evaluate() is not None and answers[3] == answers[2]  # dropout 0.5 plays no part

    trainer.save_model(str(tmp_path / "adapter"))
    model, tokenizer = load_transformers_model(str(tmp_path / "base"), str(tmp_path / "adapter"), "float32", "cpu")
    saved = [samples[0] for samples in transformers_completer(model, tokenizer, callback.settings).complete(
        list(held_out["prompt"]))]
    assert saved == answers[2]
