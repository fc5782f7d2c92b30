"""The trainer keeps GRPOTrainer's contract: reward keywords, warnings, optional reward_funcs, the completions
table, and generation settings it cannot honour refused at construction."""

import logging

import pytest
import torch

from tests.conftest import make_tiny_llama
from tests.trainer.test_trainer import _args, _dataset, contains_seven
from trl_resets import GRPOBaselineTrainer, SRPOConfig, SRPOTrainer


def test_reward_source_is_optional_but_one_is_needed(tmp_path, char_tokenizer):
    with pytest.raises(ValueError, match="No reward source"):  # TRL's own error, not a missing argument
        SRPOTrainer(model=make_tiny_llama(char_tokenizer), args=_args(tmp_path, SRPOConfig),
                    train_dataset=_dataset(), processing_class=char_tokenizer)


def test_reward_functions_get_log_extra_and_the_table_lines_up(tmp_path, char_tokenizer):
    """A reward function logging a column with log_extra: one value per trained row, beside its own completion;
    the table's advantages are the ones trained."""
    seen_keywords = set()

    def logging_reward(completions, log_extra, **kwargs):
        seen_keywords.update(kwargs)
        log_extra("echo", list(completions))
        return contains_seven(completions, **kwargs)

    args = _args(tmp_path, SRPOConfig, max_steps=1)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=logging_reward, args=args,
                          train_dataset=_dataset(), processing_class=char_tokenizer)
    outputs = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: outputs.append(generate(inputs)) or outputs[-1]
    trainer.train()
    assert {"prompts", "completion_ids", "trainer_state", "log_metric", "answer"} <= seen_keywords
    completions, echo = list(trainer._logs["completion"]), list(trainer._logs["extra"]["echo"])
    assert len(echo) == len(completions) == 8
    live = [e is not None for e in echo]
    assert any(live) and all(e == c for e, c in zip(echo, completions) if e is not None)
    trained = outputs[0]["advantages"].tolist()
    assert list(trainer._logs["advantages"]) == pytest.approx(trained)


def test_all_none_rewards_warn_as_grpo_does(tmp_path, char_tokenizer, caplog):
    def no_reward(completions, **kwargs):
        return [None] * len(completions)

    args = _args(tmp_path, SRPOConfig, max_steps=1)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=no_reward, args=args,
                          train_dataset=_dataset(), processing_class=char_tokenizer)
    logger = logging.getLogger("trl.trainer.grpo_trainer")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="trl.trainer.grpo_trainer"):
            rows = trainer._score([{"answer": "7"}] * 2, ["2+5?", "3+4?"], [[30, 31], [32]])
    finally:
        logger.removeHandler(caplog.handler)
    assert all(torch.isnan(torch.tensor(r)).all() for r in rows)
    # on TRL's logger, as GRPOTrainer warns, naming the count and the first unscored row only
    assert any("No reward function gave a reward to 2 of 2 completions" in r.getMessage()
               and "2+5?" in r.getMessage() and "3+4?" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"num_return_sequences": 2}, {"max_new_tokens": 8},
                                    {"penalty_alpha": 0.6}])
def test_generation_settings_the_sampler_cannot_honour_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}.*Remove"):
        _args(tmp_path, SRPOConfig, generation_kwargs=kwargs)
    assert _args(tmp_path, SRPOConfig, generation_kwargs={"num_beams": 1}).generation_kwargs == {"num_beams": 1}


def test_self_localization_keeps_the_dataset_system_message(tmp_path, char_tokenizer):
    from datasets import Dataset

    system = {"role": "system", "content": "Be terse."}
    data = Dataset.from_dict({"prompt": [[system, {"role": "user", "content": q}] for q in ["2+5?", "3+4?"]] * 2,
                              "answer": ["7"] * 4})
    args = _args(tmp_path, SRPOConfig, max_steps=1)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven, args=args,
                          train_dataset=data, processing_class=char_tokenizer)
    seen = []
    tokenize = trainer._tokenize_prompts
    trainer._tokenize_prompts = lambda prompts: seen.extend(prompts) or tokenize(prompts)
    trainer.train()
    localization = [p for p in seen if "Step 1:" in p[-1]["content"]]
    assert localization and all(p[0] == system and len(p) == 2 for p in localization)


def test_reward_model_honours_chat_template_kwargs(tmp_path, char_tokenizer):
    from tests.conftest import make_char_tokenizer
    from tests.trainer.test_trainer import _tiny_reward_model

    reward_tok = make_char_tokenizer()
    reward_tok.chat_template = "{% if flavor %}[{{ flavor }}]{% endif %}" + reward_tok.chat_template
    reward_model = _tiny_reward_model(reward_tok)
    args = _args(tmp_path, SRPOConfig, max_steps=1, chat_template_kwargs={"flavor": "x"})
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=[reward_model], args=args,
                          train_dataset=_dataset(conversational=True), processing_class=char_tokenizer,
                          reward_processing_classes=[reward_tok])
    prompt = [{"role": "user", "content": "2+5?"}]
    (score,) = trainer._score([{"answer": "7"}], [prompt], [char_tokenizer("so 7")["input_ids"]])[0]
    text = reward_tok.apply_chat_template(prompt + [{"role": "assistant", "content": "so 7"}], tokenize=False,
                                          flavor="x")
    assert text.startswith("[x]")
    batch = reward_tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert abs(score - reward_model(**batch).logits[0, 0].item()) < 1e-5


def test_reward_model_scores_under_inference_mode(tmp_path, char_tokenizer):
    from tests.trainer.test_trainer import _tiny_reward_model

    reward_model = _tiny_reward_model(char_tokenizer)
    modes = []
    reward_model.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=[reward_model],
                          args=_args(tmp_path, SRPOConfig, max_steps=1), train_dataset=_dataset(),
                          processing_class=char_tokenizer, reward_processing_classes=[char_tokenizer])
    trainer._score([{"answer": "7"}], ["2+5?"], [char_tokenizer("so 7")["input_ids"]])
    assert modes == [True]


def test_image_prompts_are_refused_before_any_compute(tmp_path, char_tokenizer):
    from datasets import Dataset

    image_part = {"type": "image", "image": None}
    rows = [[{"role": "user", "content": [image_part, {"type": "text", "text": "2+5?"}]}]] * 2
    for data in (Dataset.from_dict({"prompt": ["2+5?"] * 2, "image": ["a.png"] * 2}),
                 Dataset.from_list([{"prompt": p} for p in rows])):
        with pytest.raises(ValueError, match="image.*GRPOTrainer"):
            SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven,
                        args=_args(tmp_path, SRPOConfig, max_steps=1), train_dataset=data,
                        processing_class=char_tokenizer)


def test_grpo_baseline_without_args_trains_grpo_as_grpo_trainer_would(tmp_path, char_tokenizer, monkeypatch):
    """With no args, GRPOBaselineTrainer builds GRPO's default (8 iid rows per prompt, no resets), not the reset
    trainers' default split."""
    from trl.trainer.base_config import _BaseConfig

    post_init = _BaseConfig.__post_init__

    def on_cpu(self):  # TRL's configs default to bf16, which a CPU-only machine refuses unless use_cpu is set
        self.use_cpu = True
        post_init(self)

    monkeypatch.setattr(_BaseConfig, "__post_init__", on_cpu)
    monkeypatch.chdir(tmp_path)
    trainer = GRPOBaselineTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven,
                                  train_dataset=_dataset(), processing_class=char_tokenizer)
    assert (trainer.args.num_reset_prefixes, trainer.args.num_base_generations) == (0, 8)
    assert trainer.split.num_reset_prefixes == 0 and trainer.num_generations == 8
