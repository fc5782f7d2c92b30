"""Thought-level sampling with transformers' ``generate``: one decoding pass per rollout.

The KV cache runs across thoughts and every cap is enforced while decoding by a stopping
criterion that follows each row with a `ThoughtTracker`, so a rollout is sampled exactly as
thought-by-thought prompting would sample it, at the cost of plain generation. Rows stop
independently; nothing is re-encoded between thoughts.

Rows that share a context (a group's rollouts of one prompt, the suffixes of one reset prefix) share
its prefill: each distinct context is encoded once and its KV cache is copied to its rows before
decoding, as vLLM's prefix caching does. Decoding is unchanged; only the duplicate prefill goes. (A
model sampled in training mode with dropout, as TRL samples, draws one dropout mask for a shared
prefill instead of one per row; every decoding step still draws its own.)
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..thoughts import Rollout, ThoughtFormat, ThoughtTracker


class _TrackerStopping(StoppingCriteria):
    """Feeds each row's newest token to its tracker; a row stops when its tracker says so."""

    def __init__(self, trackers: list[ThoughtTracker]):
        self.trackers = trackers

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        done = [tracker.push(token) for tracker, token in zip(self.trackers, newest)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


class TransformersThoughtSampler:
    """`ThoughtSampler` over a transformers causal LM.

    Args:
        model: the (unwrapped) policy.
        tokenizer: its tokenizer; ``decode`` is used for delimiter detection.
        fmt: the thought format (caps, delimiter, split mode).
        generation_config: sampling settings (temperature, top-p, ...); ``max_new_tokens`` is set
            per call from the budgets.
        eos_ids: tokens that end a rollout.
        batch_size: most rows decoded at once (``None``: all).
        collective: set when every process must run the same number of ``generate`` calls
            (DeepSpeed ZeRO-3); an empty call then decodes one dummy token instead of skipping, and
            contexts are not deduplicated (that would add a forward pass on some processes only).
        share_prefill: encode each distinct context once and copy its cache to the rows that repeat it.
    """

    def __init__(
        self,
        model,
        tokenizer,
        fmt: ThoughtFormat,
        generation_config: GenerationConfig | None = None,
        eos_ids: list[int] | None = None,
        batch_size: int | None = None,
        collective: bool = False,
        share_prefill: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.generation_config = generation_config or GenerationConfig(do_sample=True)
        if eos_ids is None:
            eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.batch_size = batch_size
        self.collective = collective
        self.share_prefill = share_prefill and not collective
        self.generated_tokens = 0
        self.prefill_tokens = 0  # context tokens encoded (after sharing), for benchmarks

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _chunks(self, n: int):
        step = self.batch_size or max(n, 1)
        return [range(i, min(i + step, n)) for i in range(0, n, step)]

    def _generate(self, contexts: list[list[int]], **overrides) -> torch.Tensor:
        ids, mask = _left_pad(contexts, self.pad_id, self.model.device)
        config = copy.deepcopy(self.generation_config)
        for key, value in overrides.pop("config", {}).items():
            setattr(config, key, value)
        config.pad_token_id = self.pad_id
        with torch.no_grad():
            cache = self._shared_prefill(contexts, ids, mask) if self.share_prefill else None
            if cache is not None:
                overrides["past_key_values"] = cache
            else:
                self.prefill_tokens += sum(len(c) for c in contexts)
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **overrides)
        return out[:, ids.shape[1]:]

    def _shared_prefill(self, contexts, ids: torch.Tensor, mask: torch.Tensor):
        """The KV cache of every row's context but its last token, each distinct context encoded once.

        ``generate`` then feeds only the last column. Positions follow the left padding exactly as
        ``generate`` numbers them, so the cache equals the one the rows' own prefill would build.
        Returns None (plain prefill) when no context repeats.
        """
        group_of: dict[tuple, int] = {}  # context -> its group; leaders[g]: the first row of group g
        rows, leaders = [], []
        for i, context in enumerate(contexts):
            key = tuple(context)
            if key not in group_of:
                group_of[key] = len(leaders)
                leaders.append(i)
            rows.append(group_of[key])
        if len(leaders) == len(contexts) or ids.shape[1] < 2:
            return None
        head_ids, head_mask = ids[leaders, :-1], mask[leaders, :-1]
        positions = (head_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=head_ids, attention_mask=head_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True)
        cache.batch_select_indices(torch.tensor(rows, device=ids.device))
        self.prefill_tokens += sum(len(contexts[i]) for i in leaders) + len(contexts)
        return cache

    def _dummy_call(self) -> None:
        """Keeps collective decoding in step on a process with nothing to decode."""
        if self.collective:
            self._generate([[self.pad_id]], config={"max_new_tokens": 1, "do_sample": False})

    def sample(self, contexts, start_thoughts=None, token_budgets=None) -> list[Rollout]:
        n = len(contexts)
        if n == 0:
            self._dummy_call()
            return []
        start_thoughts = start_thoughts or [0] * n
        token_budgets = token_budgets or [self.fmt.max_completion_tokens] * n
        rollouts: list[Rollout] = []
        for chunk in self._chunks(n):
            trackers = [
                ThoughtTracker(self.fmt, self._decode, self.eos_ids, start_thoughts[i], max(token_budgets[i], 1))
                for i in chunk
            ]
            self._generate(
                [contexts[i] for i in chunk],
                config={"max_new_tokens": max(t.token_budget for t in trackers)},
                stopping_criteria=StoppingCriteriaList([_TrackerStopping(trackers)]),
            )
            for tracker in trackers:
                tracker.finish()
                self.generated_tokens += len(tracker.tokens)
                rollouts.append(Rollout(list(tracker.tokens), list(tracker.spans), tracker.stop_reason))
        return rollouts

    def complete(self, prompts, max_new_tokens, temperature) -> list[list[int]]:
        if not prompts:
            self._dummy_call()
            return []
        settings = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            settings["temperature"] = temperature
        else:
            settings.update(temperature=None, top_p=None, top_k=None, min_p=None)
        replies = []
        for chunk in self._chunks(len(prompts)):
            out = self._generate([prompts[i] for i in chunk], config=settings)
            for row in out.tolist():
                cut = next((j + 1 for j, tok in enumerate(row) if tok in self.eos_ids), len(row))
                replies.append(row[:cut])
        self.generated_tokens += sum(len(r) for r in replies)
        return replies
