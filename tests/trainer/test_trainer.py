"""End to end: SRPOTrainer and RRPOTrainer train on a tiny model, metrics logged."""

import math
import warnings

import pytest
import torch
from datasets import Dataset

from tests.conftest import make_tiny_llama
from trl_resets import RRPOConfig, RRPOTrainer, SRPOConfig, SRPOTrainer
from trl_resets.metrics import PREFIX, RATIOS, TOTALS


def contains_seven(completions, answer, **kwargs):
    """1.0 when the completion's text holds the answer digit."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if a in t else 0.0 for t, a in zip(texts, answer)]


def _dataset(conversational=False):
    questions = ["2+5?", "3+4?", "1+6?", "9-2?"]
    prompts = [[{"role": "user", "content": q}] for q in questions] if conversational else questions
    return Dataset.from_dict({"prompt": prompts, "answer": ["7"] * 4})


def _args(tmp_path, cls, **overrides):
    settings = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 8, "max_steps": 2, "max_completion_length": 24,
        "max_thought_tokens": 6, "max_thoughts": 6, "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none",
        "use_cpu": True, "bf16": False, "save_strategy": "no", "seed_budget": 2, "temperature": 1.0, "seed": 0,
        "localization_max_tokens": 8,
    }
    settings.update(overrides)
    return cls(**settings)


def _train(trainer_cls, args, tok, reward=contains_seven, **kwargs):
    model = make_tiny_llama(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=kwargs.pop("data", _dataset()),
                          processing_class=tok, **kwargs)
    trainer.train()
    changed = any(not (p.detach() == before[n]).all() for n, p in trainer.model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, logs, changed


def test_srpo_trains_two_steps_and_logs_reset_metrics(tmp_path, char_tokenizer):
    trainer, logs, changed = _train(SRPOTrainer, _args(tmp_path, SRPOConfig), char_tokenizer)
    assert trainer.state.global_step == 2 and len(logs) == 2 and changed
    for entry in logs:
        for key in RATIOS + TOTALS:
            assert PREFIX + key in entry, key
        assert entry[PREFIX + "tokens_base"] > 0 and entry[PREFIX + "tokens_suffix"] > 0
        assert 0.0 <= entry[PREFIX + "fallback_rate"] <= 1.0
        # a random tiny model never answers with \boxed{N}: every self-localization falls back, counted
        assert entry[PREFIX + "parse_failure_rate"] == 1.0
        assert entry[PREFIX + "tokens_localization"] > 0
        assert 0.0 < entry[PREFIX + "reset_depth_mean"] <= 1.0
        assert math.isfinite(entry["loss"])


def test_reset_prefix_is_masked_in_the_loss_inputs(tmp_path, char_tokenizer):
    args = _args(tmp_path, SRPOConfig, max_steps=1)
    model = make_tiny_llama(char_tokenizer)
    trainer = SRPOTrainer(model=model, reward_funcs=contains_seven, args=args, train_dataset=_dataset(),
                          processing_class=char_tokenizer, localizer=lambda q, thoughts: len(thoughts))
    rollouts, loss_inputs = [], []
    rollout, compute_loss = trainer._reset_rollout, trainer._compute_loss
    trainer._reset_rollout = lambda prompts: rollouts.append(rollout(prompts)) or rollouts[-1]
    trainer._compute_loss = lambda m, inputs: loss_inputs.append(inputs) or compute_loss(m, inputs)
    trainer.train()
    env_masks = rollouts[0]["env_mask"]
    masked = sum(row.count(0) for row in env_masks)
    assert masked > 0  # resets at the seed's last thought leave a non-empty prefix
    inputs = loss_inputs[0]
    active = inputs["completion_mask"] * inputs["tool_mask"]
    assert int((inputs["completion_mask"] - active).sum()) == masked
    assert sorted(active.sum(-1).tolist()) == sorted(float(row.count(1)) for row in env_masks)


def test_rrpo_trains_with_random_resets_and_conversational_prompts(tmp_path, char_tokenizer):
    args = _args(tmp_path, RRPOConfig, num_base_generations=0, num_reset_prefixes=2, num_reset_generations=4)

    def even_length(completions, **kwargs):  # a random tiny model's suffixes differ in length, so the groups carry
        texts = [c[-1]["content"] for c in completions]  # signal whatever tokens it samples (chat completions)
        return [float(len(t) % 2 == 0) for t in texts]

    trainer, logs, changed = _train(RRPOTrainer, args, char_tokenizer, reward=even_length,
                                    data=_dataset(conversational=True))
    assert trainer.state.global_step == 2 and changed
    for entry in logs:
        assert entry[PREFIX + "parse_failure_rate"] == 0.0  # random resets never fail to parse
        assert entry[PREFIX + "tokens_localization"] == 0.0
        value = entry[PREFIX + "base_pass_rate"]  # 2x4 split with G1=0 has no base group: NaN (None in logs)
        assert value is None or math.isnan(value)


def test_a_run_whose_steps_carry_no_loss_says_so_once(tmp_path, char_tokenizer):
    """G1 = 0, and a reward on another scale than success_threshold (a length, always 1 or more): every rollout
    counts as correct, no prompt finds a seed, and no row carries loss. The run warns once, naming the setting."""
    args = _args(tmp_path, RRPOConfig, num_base_generations=0, num_reset_prefixes=1, num_reset_generations=4,
                 seed_budget=0, max_completion_length=12)

    def length(completions, **kwargs):
        return [float(len(c)) + 1.0 for c in completions]

    with pytest.warns(UserWarning, match="no row of this step carries loss") as caught:
        trainer, logs, changed = _train(RRPOTrainer, args, char_tokenizer, reward=length)
    assert trainer.state.global_step == 2 and not changed
    assert all(entry[PREFIX + "fallback_rate"] == 1.0 for entry in logs)
    (warning,) = [w for w in caught if "carries loss" in str(w.message)]  # once per run, not per step
    assert "success_threshold=1.0" in str(warning.message) and "0 + 1x4" in str(warning.message)
    assert "num_base_generations" in str(warning.message)

    args = _args(tmp_path, RRPOConfig, num_base_generations=0, num_reset_prefixes=1, num_reset_generations=4,
                 seed_budget=0, max_completion_length=12, max_steps=1, success_threshold=100.0)  # the scale fixed: rollouts below it are seeds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, logs, changed = _train(RRPOTrainer, args, char_tokenizer, reward=length)
    assert changed and not [w for w in caught if "carries loss" in str(w.message)]


def test_callable_localizer_and_clipped_loss(tmp_path, char_tokenizer):
    calls = []

    def first_step_is_wrong(question, thoughts):
        calls.append((question, thoughts))
        return 1

    args = _args(tmp_path, SRPOConfig, max_steps=1, clip_surrogate=True)
    _, logs, _ = _train(SRPOTrainer, args, char_tokenizer, localizer=first_step_is_wrong)
    assert calls and all(isinstance(t, list) and t for _, t in calls)
    assert logs[0][PREFIX + "reset_index_mean"] == 1.0 and logs[0][PREFIX + "parse_failure_rate"] == 0.0


def test_bad_configurations_fail_at_construction(tmp_path, char_tokenizer):
    with pytest.raises(ValueError, match="does not match the split"):
        _args(tmp_path, SRPOConfig, num_generations=6)
    with pytest.raises(ValueError, match="num_generations"):
        _args(tmp_path, SRPOConfig, per_device_train_batch_size=4)
    for split in ({"num_base_generations": 1, "num_reset_prefixes": 1, "num_reset_generations": 7},
                  {"num_base_generations": 4, "num_reset_prefixes": 4, "num_reset_generations": 1}):
        with pytest.raises(ValueError, match="group of one row") as error:
            _args(tmp_path, SRPOConfig, **split)
        assert any(f"{name}=1" in str(error.value) for name in split)
    assert _args(tmp_path, SRPOConfig, num_base_generations=0, num_reset_prefixes=2).num_generations == 8
    assert _args(tmp_path, SRPOConfig, num_base_generations=8, num_reset_prefixes=0,
                 num_reset_generations=1).num_generations == 8  # no reset groups: G2 is unused
    model = make_tiny_llama(char_tokenizer)
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="SRPOConfig"):
        SRPOTrainer(model=model, reward_funcs=contains_seven,
                    args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
                    train_dataset=_dataset(), processing_class=char_tokenizer)


def _tiny_reward_model(tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def test_reward_model_scores_full_trajectories(tmp_path, char_tokenizer):
    reward_model = _tiny_reward_model(char_tokenizer)
    args = _args(tmp_path, SRPOConfig, max_steps=1, success_threshold=10.0)  # every rollout is a seed candidate
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=[reward_model], args=args,
                          train_dataset=_dataset(), processing_class=char_tokenizer,
                          reward_processing_classes=[char_tokenizer])
    prompts, texts = ["2+5?", "3+4?"], ["so 7", "maybe 8 or so"]
    ids = [char_tokenizer(t)["input_ids"] for t in texts]
    got = trainer._score([{"answer": "7"}] * 2, prompts, ids)
    for (score,), prompt, text in zip(got, prompts, texts):
        batch = char_tokenizer(prompt + text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            want = reward_model(**batch).logits[0, 0].item()
        assert abs(score - want) < 1e-5
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]) and logs[0][PREFIX + "fallback_rate"] == 0.0


def test_k0_split_trains_plain_grpo_with_the_thought_sampler(tmp_path, char_tokenizer):
    args = _args(tmp_path, SRPOConfig, num_base_generations=8, num_reset_prefixes=0)
    assert args.num_generations == 8
    _, logs, changed = _train(SRPOTrainer, args, char_tokenizer)
    assert changed and len(logs) == 2
    for entry in logs:
        assert entry[PREFIX + "tokens_suffix"] == 0 and entry[PREFIX + "tokens_localization"] == 0
        assert entry[PREFIX + "tokens_base"] > 0


def test_oracle_localizer_gets_the_dataset_row(tmp_path, char_tokenizer):
    seen = []

    def checker(row, thoughts):
        seen.append(row["answer"])
        return 1

    from trl_resets import OracleLocalizer

    args = _args(tmp_path, SRPOConfig, max_steps=1)
    _, logs, _ = _train(SRPOTrainer, args, char_tokenizer, localizer=OracleLocalizer(checker))
    assert seen and set(seen) == {"7"}
    assert logs[0][PREFIX + "reset_index_mean"] == 1.0 and logs[0][PREFIX + "parse_failure_rate"] == 0.0


@pytest.mark.parametrize("share,compact", [(True, True), (False, False), (True, False)])
def test_sampler_settings_reach_the_sampler(tmp_path, char_tokenizer, share, compact):
    args = _args(tmp_path, SRPOConfig, share_prefill=share, compact_decoding=compact)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven, args=args,
                          train_dataset=_dataset(), processing_class=char_tokenizer)
    with trainer._sampler() as sampler:
        assert sampler.share_prefill is share and sampler.compact is compact


def test_lora_policy_samples_merged_and_its_base_weights_come_back_untouched(tmp_path, char_tokenizer):
    """With a LoRA adapter the sampler runs on merged weights; after training, only the adapter has moved."""
    from peft import LoraConfig

    from trl_resets.sampling import transformers_backend

    merges = []
    original = transformers_backend._mergeable_lora_layers

    def counting(model):
        layers, reason = original(model)
        merges.append(bool(layers))
        return layers, reason

    transformers_backend._mergeable_lora_layers = counting
    try:
        args = _args(tmp_path, SRPOConfig)
        trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven, args=args,
                              train_dataset=_dataset(), processing_class=char_tokenizer,
                              peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                     target_modules=["q_proj", "v_proj"]))
        base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        trainer.train()
    finally:
        transformers_backend._mergeable_lora_layers = original
    assert merges and all(merges)  # every sampling round ran on merged weights
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in base.items())
    assert any(not torch.equal(params[n], p) for n, p in adapter.items())


def test_srpo_trains_with_the_iid_base_group(tmp_path, char_tokenizer):
    with pytest.raises(ValueError, match="base_group='first'.*'iid'"):
        _args(tmp_path, SRPOConfig, base_group="first")
    args = _args(tmp_path, SRPOConfig, base_group="iid")
    model = make_tiny_llama(char_tokenizer)
    trainer = SRPOTrainer(model=model, reward_funcs=contains_seven, args=args, train_dataset=_dataset(),
                          processing_class=char_tokenizer)
    assert trainer.reset_algorithm.base_group == "iid"
    built, prompt_groups = [], trainer.reset_algorithm.prompt_groups
    trainer.reset_algorithm.prompt_groups = lambda drawn, outcomes: built.append(
        (drawn, prompt_groups(drawn, outcomes))) or built[-1][1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert len(built) == 2  # two steps of one prompt x 8 rows
    seeded_at_once = 0
    for drawn, groups in built:
        # the base group is the first G1 = 4 draws, whatever their rewards; a seed among them stays a base row
        assert [r.completion_ids for r in groups.rows[:4]] == [list(d.rollout.token_ids) for d in drawn[:4]]
        if any(trainer.reset_algorithm.is_seed_candidate(d) for d in drawn[:4]):
            assert len(drawn) == 4 and trainer.reset_algorithm.seeds_of(drawn)[0] < 4 and len(groups.resets) == 1
            seeded_at_once += 1
    assert seeded_at_once  # a random tiny model fails nearly every draw
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    assert any(not (p.detach() == before[n]).all() for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("method", ["grpo", "srpo"])
def test_decode_steps_are_the_generations_sequential_decoding_steps(tmp_path, char_tokenizer, method):
    split = {"num_base_generations": 8, "num_reset_prefixes": 0} if method == "grpo" else {}
    args = _args(tmp_path, SRPOConfig, **split)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven, args=args,
                          train_dataset=_dataset(), processing_class=char_tokenizer)
    rollouts, rollout = [], trainer._reset_rollout
    trainer._reset_rollout = lambda prompts: rollouts.append(rollout(prompts)) or rollouts[-1]
    trainer.train()
    logged = [e[PREFIX + "decode_steps"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == len(rollouts) == 2
    resets = 0
    for steps, batch in zip(logged, rollouts):
        longest = max(len(ids) for ids in batch["completion_ids"])
        if method == "grpo":  # every rollout starts at once and draws one token per step: the longest one's length
            assert steps == longest
        else:  # a reset row's chain: its seed (at least its prefix), the localization reply, then its suffix
            reset_rows = [ids for ids, mask in list(zip(batch["completion_ids"], batch["env_mask"]))[4:] if any(mask)]
            assert steps >= longest and steps >= max(map(len, reset_rows), default=-1) + 1
            resets += bool(reset_rows)
    assert method == "grpo" or resets  # fillers (no seed found) have every token masked
