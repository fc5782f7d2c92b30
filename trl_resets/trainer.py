"""TRL adapters: `SRPOTrainer` and `RRPOTrainer` on top of `trl.GRPOTrainer`.

The trainer only adapts TRL; the algorithm and everything else live in modules of their own. Its hooks:

* generation, through GRPOTrainer's ``rollout_func`` extension point: thought-level sampling and Algorithm 2
  (`resets.ResetAlgorithm`, scheduled without barriers by `scheduler.run_overlapped`) build each prompt's rows; a
  reset row's completion is prefix + suffix and its prefix is masked through ``env_mask`` (TRL's tool/env mask).
  Rewards are computed while generating, since the seed search needs them (`scoring`); the policy answers
  localization prompts as text (`policy_text`); the randomness is keyed by prompt, not process (`seeding`);
* ``_generate_and_score_completions`` and ``_calculate_rewards``: TRL gets the rewards computed while generating
  and per-group advantages (`batch`) instead of per-prompt ones; the metrics TRL logged for prompts are restated
  for groups in one place (`_restate_trl_logs`);
* ``_compute_loss``: the paper's per-row mean of ``-A * pi / pi_old`` on the active tokens, then the mean over the
  rows that carry loss (`loss.reset_pg_loss`, or PPO's clipped ratio on the same masks), fed with TRL's
  log-probabilities, ``old_per_token_logps``, reference and vLLM importance-sampling inputs;
* construction checks (`checks`, and the option table `options` through the config), checkpoints of the
  generation buffer, and the model card's reset section (`model_card`).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import ClassVar

import torch
from accelerate.utils import gather, gather_object
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOTrainer

from . import batch, checkpoints, packing, seeding
from . import metrics as reset_metrics
from .checks import (
    check_trainer,
    has_image,
    is_conversational,
    no_loss_message,
    overlong_prompts_message,
)
from .comparison import STATE_KEYS, Repairer
from .config import ResetConfig, RRPOConfig, SRPOConfig
from .localizers import as_localizer
from .loss import entropy_bonus, reset_pg_loss, rows_per_micro_batch, rows_with_loss
from .model_card import PAPER
from .pipeline import Pipeline
from .policy_text import PolicyText, SystemMessages
from .resets import PromptGroups, ResetAlgorithm, ResetState, Split
from .sampling import from_trainer
from .sampling.base import DecodeRequest, StepCounter, decode
from .scheduler import can_overlap, run_overlapped
from .scoring import TrajectoryScorer
from .thoughts import Rollout, ThoughtFormat, strip_delimiter, wrap_prompt


def _reset_rollout(prompts, trainer):
    """GRPOTrainer's ``rollout_func`` contract: (prompts, trainer) -> dict of token lists."""
    return trainer._reset_rollout(prompts)


class ResetTrainer(GRPOTrainer):
    """GRPO with reset groups (Algorithm 2). Use `SRPOTrainer` or `RRPOTrainer`."""

    config_class = ResetConfig
    _tag_names: ClassVar[list[str]] = ["trl", "trl-resets"]
    _name = "Reset"
    _paper = PAPER
    _default_split: ClassVar[dict] = {}  # the split of the config built when no args are given (the config's defaults)

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: ResetConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        localizer=None,
        state_key=None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(output_dir=f"{str(name).split('/')[-1]}-{self._name}", **self._default_split)
        if not isinstance(args, ResetConfig):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__} (got {type(args).__name__}); "
                f"build one with {self.config_class.__name__}(...) instead of GRPOConfig."
            )
        for name in ("rollout_func", "tools", "environment_factory"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is not supported by {type(self).__name__}: it owns generation itself.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rollout_func.*experimental.*")
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                rollout_func=_reset_rollout,
                **kwargs,
            )
        self.split = Split(args.num_base_generations, args.num_reset_prefixes, args.num_reset_generations)
        self.thought_format = ThoughtFormat(
            delimiter=args.thought_delimiter,
            split=args.thought_split,
            max_thoughts=args.max_thoughts,
            max_thought_tokens=args.max_thought_tokens,
            max_completion_tokens=args.max_completion_length,
            answer=args.answer_format,
        )
        self.localizer = as_localizer(
            localizer,
            default=args.localizer,
            template=args.localization_template,
            max_new_tokens=args.localization_max_tokens,
            temperature=args.localization_temperature,
        )
        if state_key is not None and not callable(state_key):
            raise TypeError(f"state_key must be a callable (thought text -> hashable key), got {type(state_key).__name__}.")
        self.state_key = state_key or STATE_KEYS[args.state_key]
        self.repairer = (Repairer(args.repair_template, args.repair_max_tokens, args.repair_temperature)
                         if args.credit == "repair" else None)
        self.reset_algorithm = ResetAlgorithm(
            split=self.split,
            fmt=self.thought_format,
            seed_budget=args.seed_budget,
            success_threshold=args.success_threshold,
            aggregate=self._aggregate_rewards,
            sync_any=self._any_process,
            base_group=args.base_group,
        )
        check_trainer(self, train_dataset)
        self.pipeline = self._pipeline() if args.reset_lag else None
        self._shown_prompts = None  # pipelined resets: each row's prompt for the completions table
        self._vllm_per_thought = from_trainer.probe_prefix_caching(self) if self.use_vllm else False
        self._batch_inputs = None
        self._batch_state = None
        self._overlong_warned = False
        self._row_stats = None  # per row of the batch being generated: length, terminated, trained
        self._scorer = TrajectoryScorer(self)
        self._warned_no_loss = False  # see _warn_no_loss
        self._keys = seeding.TrainerKeys(self)  # the keys of the generation's randomness
        self.reset_history: list[dict] = []  # per generation step, this process's (h*, H_s, localizer failed)

    def _pipeline(self) -> Pipeline:
        """Pipelined resets' queue (`pipeline`), the same on every process."""
        processes = self.accelerator.num_processes
        # a vLLM server samples every process's requests itself, from its own generator, so a carried state's
        # suffixes do not depend on the process its slot falls to (nor, as without a lag, on the number of processes)
        server = self.use_vllm and self.args.vllm_mode == "server"
        if processes > 1 and not self.args.per_row_sampling_seed and not server:
            raise ValueError(f"reset_lag={self.args.reset_lag} on {processes} processes needs "
                             "per_row_sampling_seed=True: a carried reset state's suffixes are sampled on whichever "
                             "process its slot falls to, and only a generator per row samples them the same there. "
                             "Set per_row_sampling_seed=True.")
        return Pipeline(self.args.reset_lag, self.args.reset_max_age, self.args.num_reset_prefixes,
                        self.accelerator.process_index, processes, gather_object if processes > 1 else list)

    def _generations_left(self, generation: int) -> int | None:
        """Generations after ``generation`` when the run's length is known (``max_steps``), else None. A generation
        is trained for ``steps_per_generation x num_iterations`` micro-batches, ``gradient_accumulation_steps`` of
        them per optimizer step (the config makes ``steps_per_generation`` a multiple of it under a lag, so every
        epoch holds whole optimizer steps and the run ``max_steps x gradient_accumulation_steps`` micro-batches);
        the last generation may be cut short by ``max_steps``."""
        if self.args.max_steps <= 0:
            return None
        micro_batches = self.args.max_steps * self.args.gradient_accumulation_steps
        generations = -(-micro_batches // (self.args.steps_per_generation * self.num_iterations))
        return generations - 1 - generation

    # ------------------------------------------------------------------ generation
    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _wrap(self, prompt):
        """A dataset prompt in this trainer's rollout template."""
        return wrap_prompt(prompt, self.args.rollout_template, self.args.thought_delimiter)

    @property
    def _zero3(self) -> bool:
        return from_trainer.is_zero3(self)

    def _transformers_sampler(self, model):
        return from_trainer.transformers_sampler(self, model)

    def _sampler(self):
        """This generation's thought sampler (`sampling.from_trainer`)."""
        return from_trainer.open_sampler(self, self._vllm_per_thought)

    def _tokenized(self, prompts: list) -> list:
        return self._tokenize_prompts(prompts)[0]

    def _decode_text(self, ids: list[int]) -> str:
        return self.processing_class.decode(ids, skip_special_tokens=True)

    def _describe(self, rollout: Rollout) -> list[str]:
        decode = self.processing_class.decode
        return [strip_delimiter(decode(rollout.thought_ids(h), skip_special_tokens=True), self.thought_format)
                for h in range(rollout.num_thoughts)]

    def _aggregate_rewards(self, rewards: list[float]) -> float:
        weights = self.reward_weights.tolist()
        terms = [w * r for w, r in zip(weights, rewards) if not math.isnan(r)]
        return sum(terms) if terms else math.nan

    def _score(self, rows_inputs: list[dict], prompts: list, completion_ids: list[list[int]]) -> list[list[float]]:
        """The reward functions on full trajectories, with the dataset columns as keyword arguments (`scoring`)."""
        return self._scorer(rows_inputs, prompts, completion_ids)

    def _warn_overlong_prompts(self, prompt_ids: list[list[int]]) -> None:
        """Once per run, with the count, when prompts leave the model's positions no room for the rollout (TRL 1.16
        has no `max_prompt_length` to cut them; with vLLM, `max_model_len` is checked before a request is sent)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if self._overlong_warned or self.use_vllm or not isinstance(limit, int):
            return
        message = overlong_prompts_message(prompt_ids, self.args.max_completion_length, limit)
        if message:
            self._overlong_warned = True
            warnings.warn(message, stacklevel=2)

    def _reset_rollout(self, prompts: list) -> dict:
        if any(has_image(p) for p in prompts):  # a streamed dataset is not checked at construction
            raise ValueError("a prompt carries an image part, but the reset trainers sample and score text only: "
                             "the image would be dropped. Train vision-language prompts with TRL's GRPOTrainer.")
        wrapped = [self._wrap(p) for p in prompts]
        prompt_ids, _, _ = self._tokenize_prompts(wrapped)
        prompt_ids = [list(ids) for ids in prompt_ids]
        self._warn_overlong_prompts(prompt_ids)
        if not self.model.training:
            with self._sampler() as sampler:
                seeds = self._keys.eval_sampling_seeds(len(prompt_ids))
                if seeds is None:
                    rollouts = sampler.sample(prompt_ids)
                else:
                    budget = sampler.fmt.max_completion_tokens
                    rollouts = decode(sampler.stream(), [DecodeRequest(list(ids), token_budget=budget, seed=seed)
                                                         for ids, seed in zip(prompt_ids, seeds)], self._any_process)
            self._batch_state = None
            self._row_stats = batch.stats_of_rows([(len(r.token_ids), r.stop_reason, 1.0) for r in rollouts],
                                         self.accelerator.device)
            return {"prompt_ids": prompt_ids, "completion_ids": [r.token_ids for r in rollouts],
                    "logprobs": batch.logprobs_or_none([r.logprobs for r in rollouts]),
                    "env_mask": [[1] * len(r.token_ids) for r in rollouts]}

        n = self.num_generations
        firsts = list(range(0, len(prompts), n))
        inputs = self._batch_inputs
        self._scorer.unscored = [0, 0]

        def score(owners, completion_ids):  # a carried reset state's rows: its origin prompt's columns
            columns = [u.columns if isinstance(u, ResetState) else inputs[firsts[u]] for u in owners]
            return self._score(columns, [c["prompt"] for c in columns], completion_ids)

        lag = None
        if self.pipeline is not None:
            generation, _ = self._keys.global_prompts(len(firsts))
            lag = self.pipeline.begin(generation, len(firsts), self._generations_left(generation))

        questions = [batch.question_text(prompts[i]) for i in firsts]
        with self._sampler() as sampler:
            localizer = SystemMessages(self.localizer)
            policy = PolicyText(sampler, self._tokenized, self._decode_text, is_conversational(prompts[0]))
            common = {"contexts": [prompt_ids[i] for i in firsts], "questions": questions, "score": score,
                      "localizer": localizer, "describe": self._describe, "policy": policy,
                      "rng": self._keys.prompt_generators(len(firsts)), "rows": [inputs[i] for i in firsts],
                      "lag": lag}
            if can_overlap(localizer, policy) or self.split.is_grpo:  # no barriers between the phases
                stream = StepCounter(sampler.stream())
                groups = run_overlapped(self.reset_algorithm, stream=stream, **common,
                                        sampling_seeds=self._keys.prompt_sampling_seeds(len(firsts)))
                if getattr(stream.inner, "one_token_per_step", False):  # the same on every process (the settings')
                    steps = self.accelerator.gather(torch.tensor([float(stream.steps)], device=self.accelerator.device))
                    self._metrics["train"][reset_metrics.PREFIX + "decode_steps"].append(steps.max().item())
            else:  # a localizer that needs the policy for a whole batch at once
                groups = self.reset_algorithm.run(sampler=sampler, **common)
            self._batch_state = self._summarize(groups, questions, policy)
        if lag is not None:
            for name, value in self.pipeline.end(lag, groups).items():
                self._metrics["train"][name].append(value)
            self._batch_state["carried"] = torch.tensor(
                [float(row.origin is not None and row.weight > 0) for g in groups for row in g.rows],
                device=self.accelerator.device)
            origin_prompts = {s.origin: s.columns["prompt"] for s in lag.ready}
            self._shown_prompts = [origin_prompts[row.origin] if row.origin is not None else prompts[i]
                                   for i, g in zip(firsts, groups) for row in g.rows]
        rows = [row for g in groups for row in g.rows]
        self._row_stats = batch.stats_of_rows([(len(r.completion_ids), r.stop_reason, r.weight) for r in rows],
                                     self.accelerator.device)
        self._scorer.log_row_extras(rows)
        return {
            "prompt_ids": [prompt_ids[i] if row.context is None else row.context  # a carried row: its origin's
                           for i, g in zip(firsts, groups) for row in g.rows],
            "completion_ids": [row.completion_ids for row in rows],
            "logprobs": batch.logprobs_or_none([row.logprobs for row in rows]),
            "env_mask": [[0] * row.prefix_len + [1] * row.active_tokens for row in rows],
        }

    def _summarize(self, groups: list[PromptGroups], questions: list[str], policy) -> dict:
        """This process's rows as tensors for TRL: rewards, per-group advantages (per token with comparison-based
        credit) and metric sums (`batch.summarize`); the resets go to the run's reset history."""
        self.reset_history.append({"step": self.state.global_step + 1, "resets": [
            (r.reset_index, r.num_thoughts, r.localizer_failed)
            + (() if r.origin is None else (r.origin.generation, r.origin.prompt))  # a carried reset's origin
            for g in groups for r in g.resets]})
        credit = None
        if self.args.credit != "uniform":
            decode = self.processing_class.decode

            def credit(rows, group_ids, advantages):
                texts = [[strip_delimiter(decode(row.completion_ids[a:b], skip_special_tokens=True),
                                          self.thought_format) for a, b in row.thought_spans] for _, row in rows]
                return batch.token_credit(rows, group_ids, advantages, texts, questions, self.args, self.state_key,
                                          self.repairer, policy)

        return batch.summarize(groups, self.split, self.args, tuple(self._scorer.unscored), self.accelerator.device, credit)

    # ------------------------------------------------------------------ rewards and advantages
    def _generate_and_score_completions(self, inputs):
        self._batch_inputs = inputs
        self._batch_state = None
        output = super()._generate_and_score_completions(inputs)
        state, self._batch_state, self._batch_inputs = self._batch_state, None, None
        if "tool_mask" in output:  # rows that carry loss in the generation batch, all processes: the loss's mean
            live = rows_with_loss(output["completion_mask"] * output["tool_mask"]).sum()
            output["num_loss_rows"] = self.accelerator.gather(live).sum()
        values, group_sums, untrained_tokens = {}, None, 0.0
        if state is not None:
            output["advantages"] = state["advantages"]
            if "carried" in state:  # pipelined resets: the rows whose prefix a past policy sampled
                output["carried_rows"] = state["carried"]
            if "token_advantages" in state:
                output["token_advantages"] = batch.padded(state["token_advantages"], output["completion_ids"])
                sums = self.accelerator.reduce(state["credit_sums"], reduction="sum").tolist()
                credit_values = reset_metrics.finalize_credit(sums)
                for name, value in credit_values.items():
                    self._metrics["train"][name].append(value)
                untrained_tokens += credit_values[reset_metrics.CREDIT_PREFIX + "tokens_repair"]
            group_sums = self.accelerator.reduce(state["metric_sums"], reduction="sum").tolist()
            values = reset_metrics.finalize(group_sums)
            for name, value in values.items():
                self._metrics["train"][name].append(value)
            # tokens the policy generated outside every row's active tokens (which TRL counted): seeds, localization
            # replies, unused draws, repairs
            untrained_tokens += values[reset_metrics.PREFIX + "generated_tokens"] - sum(
                values[reset_metrics.PREFIX + key] for key in ("tokens_base", "tokens_suffix"))
            if self.split.num_base_generations == 0 and values[reset_metrics.PREFIX + "fallback_rate"] == 1.0:
                self._warn_no_loss()
        row_stats, self._row_stats = self._row_stats, None
        self._restate_trl_logs(state, group_sums, untrained_tokens, row_stats)
        return output

    # The statements of TRL 1.16's GRPOTrainer (by method) whose results `_restate_trl_logs` rewrites;
    # tests/trainer/test_parity_metrics.py fails when one of them moves (a TRL upgrade must be checked against it).
    TRL_LOG_STATEMENTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "_generate_and_score_completions": (
            'self._logs["prompt"].extend(',
            'self._logs["advantages"].extend(',
            'self._metrics[mode]["frac_reward_zero_std"].append(',
        ),
        "_generate": (
            'self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]',
            'self._metrics[mode]["completions/mean_length"].append(',
            'self._metrics[mode]["completions/clipped_ratio"].append(',
        ),
    }

    def _restate_trl_logs(self, state, group_sums, untrained_tokens: float, row_stats) -> None:
        """Every write into TRL's private logs, in one place. GRPOTrainer's ``_generate_and_score_completions`` has
        just logged (with ``_generate``), from the statements in `TRL_LOG_STATEMENTS`, numbers that describe rows by prompt and by their
        active tokens; this restates them for the reset groups and the trained rows' whole trajectories:

        * ``_logs["advantages"]`` (the completions table): the advantages trained, per group, not TRL's per prompt;
        * ``_logs["prompt"]`` (the completions table), with pipelined resets: a carried row's origin prompt;
        * ``frac_reward_zero_std``: the share of groups (base and reset) whose rewards are all equal;
        * ``num_tokens``: TRL added each row's prompt and active tokens; the tokens generated outside them are
          added, so it counts every generated token once, as GRPO's does;
        * ``completions/*`` (lengths, terminated and clipped shares): over the rows that carry loss, whole
          trajectories (a reset row's prefix included).
        """
        if state is not None:
            trained = gather(state["advantages"]).tolist()
            for _ in trained:
                self._logs["advantages"].pop()
            self._logs["advantages"].extend(trained)
            self._metrics["train"]["frac_reward_zero_std"][-1] = reset_metrics.zero_std_group_fraction(group_sums)
            self.state.num_input_tokens_seen += int(untrained_tokens)
            self._metrics["train"]["num_tokens"] = [self.state.num_input_tokens_seen]
        shown, self._shown_prompts = self._shown_prompts, None
        if shown is not None:
            shown = gather_object(shown) if self.accelerator.num_processes > 1 else shown
            logs = self._logs["prompt"]
            for i, prompt in enumerate(shown[-len(logs):], start=max(len(logs) - len(shown), 0)):
                logs[i] = prompt
        if row_stats is not None:
            stats = gather(row_stats)
            trained_rows = stats[stats[:, 2] > 0]
            lengths, terminated = trained_rows[:, 0].tolist(), (trained_rows[:, 1] > 0).tolist()
            metrics = self._metrics["train" if self.model.training else "eval"]
            for name, value in reset_metrics.completion_stats(lengths, terminated).items():
                metrics[name][-1] = value

    def _warn_no_loss(self) -> None:
        """Once per run: a step in which no row carries loss (num_base_generations=0 and every seed slot fell back)."""
        if not self._warned_no_loss:
            self._warned_no_loss = True
            warnings.warn(no_loss_message(self.split, self.args, self.reset_algorithm.first_round), stacklevel=2)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._batch_state is None:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return gather(self._batch_state["rewards_per_func"])

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        if "tool_mask" not in inputs:
            raise RuntimeError(
                "the loss inputs carry no tool_mask: TRL no longer hands over the env_mask that masks each reset "
                "row's prefix, so the prefix would be trained. This trl version is not supported by trl-resets; "
                "install the pinned one (see constraints.txt)."
            )
        completion_mask = inputs["completion_mask"]
        mask = completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        advantages = inputs["advantages"]
        old_logps = inputs.get("old_per_token_logps")
        weights = torch.ones_like(logps)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = weights * inputs["importance_sampling_ratio"]
        acted_on = mask  # the tokens the policy term acts on
        if self.top_entropy_quantile < 1.0:
            acted_on = mask * self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            weights = weights * acted_on
        if self.off_policy_mask_threshold is not None:
            old = logps.detach() if old_logps is None else old_logps
            weights = weights * self.get_off_policy_mask(
                advantages.unsqueeze(1), logps, inputs.get("sampling_per_token_logps", old), mask,
                self.off_policy_mask_threshold,
            )
        mode = "train" if self.model.training else "eval"
        num_rows = None  # eval: the mean over this batch's rows
        if mode == "train":
            num_rows = rows_per_micro_batch(
                inputs["num_loss_rows"].item(), self.accelerator.num_processes,
                self.current_gradient_accumulation_steps, self.args.steps_per_generation,
            )
        terms = reset_pg_loss(
            logps,
            inputs.get("token_advantages", advantages),
            mask,
            old_logps=old_logps,
            clip=(self.epsilon_low, self.epsilon_high) if self.args.clip_surrogate else None,
            delta=self.args.delta,
            ref_logps=inputs.get("ref_per_token_logps"),
            beta=self.beta,
            kl_bias_correction=self.args.use_bias_correction_kl,
            token_weights=weights,
            num_rows=num_rows,
        )
        loss = terms.loss

        def masked_mean(values):
            totals = self.accelerator.reduce(
                torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)]).detach(), reduction="sum"
            )
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if terms.kl is not None:
            self._metrics[mode]["kl"].append(masked_mean(terms.kl))
        if "carried_rows" in inputs and "sampling_per_token_logps" in inputs:
            self._log_carried_drift(mode, logps, inputs)
        self._metrics[mode]["entropy"].append(masked_mean(entropies))
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(terms.policy_loss).mean().item())
        if self.args.clip_surrogate:
            self._log_clip_ratios(mode, logps, old_logps, inputs.get("token_advantages", advantages), mask)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.entropy_coef != 0.0:  # GRPO's static entropy bonus (the adaptive one is refused by the config)
            loss = loss - self.entropy_coef * entropy_bonus(entropies, acted_on) / accumulation
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:  # TRL's MoE load-balancing loss, scaled for accumulation as GRPO does
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    def _log_carried_drift(self, mode, logps, inputs) -> None:
        """Pipelined resets: the mean of log pi_current - log pi_sampling over the carried rows' prefix tokens (sampled
        by the policy of an earlier generation), from this forward pass; NaN when the batch holds none."""
        prefix = inputs["completion_mask"] * (1 - inputs["tool_mask"]) * inputs["carried_rows"][:, None]
        ratio = torch.nan_to_num(logps.detach() - inputs["sampling_per_token_logps"], nan=0.0)
        totals = self.accelerator.reduce(torch.stack([(ratio * prefix).sum(), prefix.sum()]).double(), reduction="sum")
        drift = (totals[0] / totals[1]).item() if totals[1] > 0 else math.nan
        self._metrics[mode][reset_metrics.PREFIX + "carried_prefix_drift"].append(drift)

    def _log_clip_ratios(self, mode, logps, old_logps, advantages, mask) -> None:
        """GRPO's ``clip_ratio/*`` metrics, over all processes (`metrics.clip_ratios`)."""
        values = reset_metrics.clip_ratios(logps, old_logps, advantages, mask, self.epsilon_low, self.epsilon_high,
                                           lambda t: self.accelerator.reduce(t, reduction="sum"),
                                           self.accelerator.gather)
        for name, value in values.items():
            self._metrics[mode][name].append(value)

    # ------------------------------------------------------------------ packed forward passes (pack_shared_prefixes)
    _pack_warned = False  # see _pack_groups

    def _prepare_inputs(self, generation_batch):
        """TRL's micro-batches; with ``pack_shared_prefixes``, a new generation's micro-batches are laid out again
        (same sizes, TRL's random order of groups) with every group whole in one micro-batch where it fits, so that
        packing finds it (`packing.regroup_generation`)."""
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if not self.args.pack_shared_prefixes or self._buffered_inputs is buffered or not self.model.training:
            return inputs
        self._buffered_inputs = packing.regroup_generation(self._buffered_inputs)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's per-token log-probabilities and entropies (old policy, reference, update). With
        ``pack_shared_prefixes``, each group's shared tokens are forwarded once (`packing`), through the same fused
        LM head, into the same (rows, logits_to_keep) shape."""
        batch_size = batch_size or input_ids.size(0)
        found = (self._pack_groups(model, input_ids, attention_mask, batch_size, compute_aux_loss, extra)
                 if self.args.pack_shared_prefixes else None)
        if found is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss, **extra)
        logps, entropies = packing.packed_forward(model, self.accelerator.unwrap_model(model), input_ids,
                                                  attention_mask, logits_to_keep, found, compute_entropy,
                                                  self.accelerator.autocast)
        return logps, entropies, None

    def _pack_groups(self, model, input_ids, attention_mask, batch_size, compute_aux_loss, extra):
        """`packing.plan`'s (group id, shared length per row, micro-batches), or None: packing would not cost less,
        or the batch cannot be packed (`packing.forward_refusal`, warned once per run; the rows are then forwarded
        as TRL does)."""
        unwrapped = self.accelerator.unwrap_model(model)
        reason = packing.forward_refusal(unwrapped, input_ids, attention_mask, self._zero3 or self.is_fsdp_enabled,
                                         compute_aux_loss, extra)
        if reason is not None:
            if not self._pack_warned:
                self._pack_warned = True
                warnings.warn(f"pack_shared_prefixes=True, but the rows are forwarded unpacked: {reason}. Training "
                              "is unchanged, only slower; set pack_shared_prefixes=False to silence this (warned "
                              "once per run).", stacklevel=3)
            return None
        # packs that cost less than their rows, with SDPA's and eager's dense masked attention
        return packing.plan(input_ids, attention_mask, batch_size, packing.pair_cost(unwrapped))

    # ------------------------------------------------------------------ model card
    # ------------------------------------------------------------------ checkpoints
    def _buffer_file(self, folder: str) -> str:
        return os.path.join(folder, f"generation_buffer_{self.args.process_index}.pt")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """TRL's training loop; ``resume_from_checkpoint=True`` resumes from the latest *complete* checkpoint (one
        whose save finished, see `checkpoints`), where transformers would take the latest folder."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoints.last_complete_checkpoint(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, str | os.PathLike):
            checkpoints.warn_if_incomplete(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """TRL's checkpoint, made complete-or-absent: the marker is written once every process has written its
        files, and older checkpoints are deleted (``save_total_limit``) only after that."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            checkpoints.clear_complete(folder)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.mark_complete(folder, self.state.global_step)
            rotate_checkpoints(run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=True)

    def _save_rng_state(self, output_dir: str) -> None:
        """TRL's RNG states, plus this process's generation buffer. (The reset choices need no saved state:
        their generators are keyed by the generation, see `seeding.TrainerKeys`.)"""
        super()._save_rng_state(output_dir)
        # A checkpoint between the optimizer steps of one generation (steps_per_generation >
        # gradient_accumulation_steps): keep the generation's rows, or the resumed run would sample new ones.
        buffer = {"step": self._step, "buffered_inputs": self._buffered_inputs}
        if self.pipeline is not None:  # pipelined resets: the states waiting for later generations
            buffer["reset_queue"] = self.pipeline.queue.state_dict()
        checkpoints.write_atomically(self._buffer_file(output_dir), lambda path: torch.save(buffer, path))

    def _load_rng_state(self, checkpoint) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._buffer_file(checkpoint)
        if not os.path.exists(path):
            warnings.warn(f"{path} is missing: the resumed run samples the rest of the current generation anew "
                          "instead of training on the rows the interrupted run had sampled.", stacklevel=2)
            return
        buffer = torch.load(path, map_location=self.accelerator.device, weights_only=False)
        self._step, self._buffered_inputs = buffer["step"], buffer["buffered_inputs"]
        if self.pipeline is not None:
            if "reset_queue" not in buffer:
                raise ValueError(f"{path} holds no queue of reset states: the checkpoint was saved without "
                                 "pipelined resets. Resume it with reset_lag=0.")
            self.pipeline.queue.load_state_dict(buffer["reset_queue"])

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (trainer name, tags, paper citation) plus the method, split, localizer and headline metrics."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            from pathlib import Path

            from .model_card import add_reset_section

            add_reset_section(Path(self.args.output_dir) / "README.md", self, dataset_name)


class SRPOTrainer(ResetTrainer):
    """Self-Reset Policy Optimization: the policy localizes its own first wrong thought (default localizer)."""

    config_class = SRPOConfig
    _tag_names: ClassVar[list[str]] = ["trl", "trl-resets", "srpo"]
    _name = "SRPO"


class RRPOTrainer(ResetTrainer):
    """Random-Reset Policy Optimization: the reset index is uniform over the seed's thoughts."""

    config_class = RRPOConfig
    _tag_names: ClassVar[list[str]] = ["trl", "trl-resets", "rrpo"]
    _name = "RRPO"


class GRPOBaselineTrainer(ResetTrainer):
    """The like-for-like GRPO baseline: `ResetTrainer` with ``num_reset_prefixes=0`` (the same thought sampler,
    rewards and loss, no resets), for comparisons with SRPO and RRPO on equal terms."""

    _tag_names: ClassVar[list[str]] = ["trl", "trl-resets", "grpo"]
    _name = "GRPO"
    _default_split: ClassVar[dict] = {"num_base_generations": 8, "num_reset_prefixes": 0}  # GRPOConfig's 8 rows per prompt
