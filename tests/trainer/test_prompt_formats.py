"""Plain-text and chat-format prompts in every path (SRPO with self-localization, RRPO, the GRPO baseline; the
transformers sampler and the vLLM stand-in), and the tokenizer's pad token."""

import math

import pytest
from datasets import Dataset

from tests.conftest import make_char_tokenizer, make_tiny_llama
from tests.helpers import fake_vllm
from tests.trainer.test_trainer import _args
from trl_resets import GRPOBaselineTrainer, ResetConfig, RRPOConfig, RRPOTrainer, SRPOConfig, SRPOTrainer

QUESTIONS = ["2+5?", "3+4?"]
METHODS = {
    "srpo": (SRPOTrainer, SRPOConfig, {}),
    "rrpo": (RRPOTrainer, RRPOConfig, {}),
    "grpo": (GRPOBaselineTrainer, ResetConfig, {"num_base_generations": 8, "num_reset_prefixes": 0}),
}


def _data(chat):
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in QUESTIONS] \
        if chat else QUESTIONS
    return Dataset.from_dict({"prompt": prompts, "answer": ["7"] * len(QUESTIONS)})


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("method", list(METHODS))
def test_plain_and_chat_prompts_train_in_every_path(tmp_path, monkeypatch, char_tokenizer, method, chat, backend):
    trainer_cls, config_cls, overrides = METHODS[method]
    if backend == "vllm":
        fake_vllm.install(monkeypatch)
        overrides = {**overrides, "use_vllm": True, "vllm_mode": "colocate"}
    args = _args(tmp_path, config_cls, max_steps=1, **overrides)
    scored = []

    def reward(prompts, completions, answer, **kwargs):
        scored.append((prompts, completions))
        texts = [c[-1]["content"] if chat else c for c in completions]
        return [1.0 if a in t else 0.0 for t, a in zip(texts, answer)]

    trainer = trainer_cls(model=make_tiny_llama(char_tokenizer), reward_funcs=reward, args=args,
                          train_dataset=_data(chat), processing_class=char_tokenizer)
    tokenized = []
    tokenize = trainer._tokenize_prompts

    def spy(prompts):
        out = tokenize(prompts)
        tokenized.append((prompts, [char_tokenizer.decode(ids) for ids in out[0]]))
        return out

    trainer._tokenize_prompts = spy
    trainer.train()
    (loss,) = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert math.isfinite(loss)

    # the rollouts' prompts: in the dataset's format, the question wrapped in the rollout template, and tokenized
    # through the chat template (its role markers) exactly when the prompts are conversational
    prompts, texts = tokenized[0]
    if chat:
        assert all(p[0] == {"role": "system", "content": "Be brief."} and p[-1]["role"] == "user" for p in prompts)
        questions = [p[-1]["content"] for p in prompts]
    else:
        assert all(isinstance(p, str) for p in prompts)
        questions = prompts
    assert all(q not in QUESTIONS and any(question in q for question in QUESTIONS) for q in questions)
    assert all(("<|user|>" in t and "<|system|>Be brief." in t) == chat for t in texts)

    # the reward functions see the dataset's prompts and completions in the same format
    assert scored
    for prompts, completions in scored:
        if chat:
            assert all(p[-1]["content"] in QUESTIONS for p in prompts)
            assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions)
        else:
            assert set(prompts) <= set(QUESTIONS) and all(isinstance(c, str) for c in completions)

    # self-localization asks the policy in the dataset's format too, after the prompt's system message
    asked = [p for p, _ in tokenized[1:]]
    if method != "srpo":  # no resets (GRPO), or random ones (RRPO): no one is asked
        assert not asked
        return
    assert asked, "no localization prompt reached the policy"
    for batch in asked:
        for prompt in batch:
            if chat:
                assert prompt[0] == {"role": "system", "content": "Be brief."}
                assert prompt[-1]["role"] == "user" and "Step 1:" in prompt[-1]["content"]
            else:
                assert isinstance(prompt, str) and "Step 1:" in prompt


def test_a_tokenizer_without_a_pad_token_pads_with_eos_as_grpo_does(tmp_path):
    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer)
    tokenizer.pad_token = None
    trainer = SRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=_args(tmp_path, SRPOConfig, max_steps=1), train_dataset=_data(False),
                          processing_class=tokenizer)
    assert tokenizer.pad_token == "<eos>" and model.generation_config.pad_token_id == tokenizer.eos_token_id
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_tokenizer_without_pad_and_eos_tokens_is_refused_with_the_fix(tmp_path):
    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token = None
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match=r"has no pad_token and no eos_token.*add_special_tokens\(\{'pad_token'"):
        SRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                    args=_args(tmp_path, SRPOConfig, max_steps=1), train_dataset=_data(False),
                    processing_class=tokenizer)
