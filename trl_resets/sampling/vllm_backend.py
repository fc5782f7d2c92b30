"""Thought-level sampling through TRL's vLLM wrapper (`trl.generation.vllm_generation.VLLMGeneration`).

Two ways to drive the engine, both sampling exactly the thought-by-thought distribution (every
token is drawn from the exact token ids before it, and where a rollout stops is a function of those
ids alone, so cutting a longer draw at the stop point changes nothing):

* **per-thought rounds** (only when the engine caches prefixes): each round asks for one more
  thought per unfinished row, stopping at the thought boundary; the next round's prompt is the
  previous prompt plus the tokens just sampled, which the prefix cache already holds, so nothing
  is encoded twice. Rows stop as soon as their tracker says so (final answer, caps).
* **one pass** (prefix caching off or unknown): a single request per rollout for its whole token
  budget, cut afterwards by the same tracker. Nothing is re-encoded; tokens drawn after the stop
  point are discarded (counted in ``discarded_tokens``).

Modes: ``colocate`` calls ``VLLMGeneration.generate`` on each process's own engine; ``server``
gathers every process's requests, sends them from the main process through the wrapper's
``VLLMClient`` in one call, and hands each process its own completions back, so processes may
have different numbers of unfinished rows in a round.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from ..thoughts import Rollout, ThoughtFormat, ThoughtTracker


def prefix_caching_enabled(engine) -> bool | None:
    """Whether the engine behind a ``VLLMGeneration`` caches prefixes (None when it cannot be told)."""
    try:
        if engine.mode == "colocate":
            return bool(engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
        client = getattr(engine, "vllm_client", None)
        if client is None:  # server mode, not the main process
            return None
        return bool(client.get_server_info()["cache_config"]["enable_prefix_caching"])
    except (AttributeError, KeyError, TypeError, RuntimeError):
        return None


def _sampled_logprobs(per_token) -> list[float]:
    """The sampled token's logprob per position ([[lp, ...], ...] with the sampled one first); NaN when missing."""
    out = []
    for entry in per_token or []:
        value = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
        out.append(float("nan") if value is None else float(value))
    return out


class VLLMThoughtSampler:
    """`ThoughtSampler` over TRL's ``VLLMGeneration`` (``use_vllm=True``, colocate or server).

    Args:
        engine: the trainer's ``VLLMGeneration`` (weights already synced by the trainer).
        tokenizer: the policy's tokenizer (``decode`` for boundary detection).
        fmt: the thought format.
        eos_ids: tokens that end a rollout.
        per_thought: per-thought rounds (needs prefix caching) or one pass; see the module docstring.
        sync_any: ``flag -> any process's flag``; keeps processes in the same number of rounds.
        gather: ``local list -> list of every process's lists`` (server mode).
        broadcast: ``object on the main process -> that object everywhere`` (server mode).
        is_main_process: whether this process talks to the server.
        process_index: this process's rank (server mode slicing).
    """

    def __init__(
        self,
        engine,
        tokenizer,
        fmt: ThoughtFormat,
        eos_ids: list[int] | None = None,
        per_thought: bool = True,
        sync_any: Callable[[bool], bool] = bool,
        gather: Callable[[list], list[list]] | None = None,
        broadcast: Callable[[object], object] | None = None,
        is_main_process: bool = True,
        process_index: int = 0,
    ):
        if engine.mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode must be 'colocate' or 'server', got {engine.mode!r}.")
        self.engine = engine
        self.tokenizer = tokenizer
        self.fmt = fmt
        if eos_ids is None:
            eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = frozenset(eos_ids)
        self.per_thought = per_thought
        self.sync_any = sync_any
        self.gather = gather or (lambda items: [items])
        self.broadcast = broadcast or (lambda obj: obj)
        self.is_main_process = is_main_process
        self.process_index = process_index
        self.generated_tokens = 0
        self.discarded_tokens = 0
        self.rounds = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ engine calls
    @contextmanager
    def _settings(self, max_tokens: int, temperature: float | None, extra: dict):
        """Temporarily points the wrapper's sampling settings at this request."""
        engine = self.engine
        saved = (engine.max_completion_length, engine.temperature, engine.generation_kwargs)
        engine.max_completion_length = max_tokens
        if temperature is not None:
            engine.temperature = temperature
        engine.generation_kwargs = {**(saved[2] or {}), **extra}
        try:
            yield
        finally:
            engine.max_completion_length, engine.temperature, engine.generation_kwargs = saved

    def _request(self, prompts: list[list[int]], max_tokens: int, temperature=None, extra=None):
        """Completion ids and sampled-token logprobs for each prompt (one completion each)."""
        extra = extra or {}
        if self.engine.mode == "server":
            return self._request_server(prompts, max_tokens, temperature, extra)
        if not prompts:
            return [], []
        with self._settings(max_tokens, temperature, extra):
            _, completions, logprobs, _ = self.engine.generate(prompts, None, 1)
        completions = [list(ids) for ids in completions]
        logprobs = [_sampled_logprobs(lp) for lp in logprobs] if logprobs is not None else [
            [float("nan")] * len(ids) for ids in completions
        ]
        return completions, logprobs

    def _request_server(self, prompts, max_tokens, temperature, extra):
        engine = self.engine
        everyone = self.gather(list(prompts))
        payload = None
        if self.is_main_process:
            flat = [p for part in everyone for p in part]
            completions, logprobs = [], []
            if flat:
                out = engine.vllm_client.generate(
                    prompts=flat,
                    n=1,
                    repetition_penalty=engine.repetition_penalty,
                    temperature=engine.temperature if temperature is None else temperature,
                    top_p=engine.top_p,
                    top_k=engine.top_k,
                    min_p=0.0 if engine.min_p is None else engine.min_p,
                    max_tokens=max_tokens,
                    logprobs=engine.logprobs,
                    generation_kwargs={**(engine.generation_kwargs or {}), **extra},
                )
                completions = [list(ids) for ids in out["completion_ids"]]
                raw = out.get("logprobs")
                logprobs = [_sampled_logprobs(lp) for lp in raw] if raw is not None else [
                    [float("nan")] * len(ids) for ids in completions
                ]
            payload = (completions, logprobs, [len(part) for part in everyone])
        completions, logprobs, sizes = self.broadcast(payload)
        start = sum(sizes[: self.process_index])
        end = start + sizes[self.process_index]
        return completions[start:end], logprobs[start:end]

    # ------------------------------------------------------------------ ThoughtSampler
    def sample(self, contexts, start_thoughts=None, token_budgets=None) -> list[Rollout]:
        n = len(contexts)
        start_thoughts = start_thoughts or [0] * n
        token_budgets = token_budgets or [self.fmt.max_completion_tokens] * n
        trackers = [
            ThoughtTracker(self.fmt, self._decode, self.eos_ids, start_thoughts[i], max(token_budgets[i], 1))
            for i in range(n)
        ]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        if self.per_thought:
            self._sample_by_thought(contexts, trackers, logprobs)
        else:
            self._sample_one_pass(contexts, trackers, logprobs)
        rollouts = []
        for tracker, lps in zip(trackers, logprobs):
            tracker.finish()
            self.generated_tokens += len(tracker.tokens)
            rollouts.append(Rollout(list(tracker.tokens), list(tracker.spans), tracker.stop_reason,
                                    lps[: len(tracker.tokens)]))
        return rollouts

    def _feed(self, tracker: ThoughtTracker, lps: list[float], ids: list[int], new_lps: list[float]) -> None:
        for position, token in enumerate(ids):
            if tracker.done:
                self.discarded_tokens += len(ids) - position
                return
            tracker.push(token)
            lps.append(new_lps[position] if position < len(new_lps) else float("nan"))

    def _sample_one_pass(self, contexts, trackers, logprobs) -> None:
        # Every process asks for the same budget (the server applies one setting to the whole batch).
        completions, lps = self._request([list(c) for c in contexts], self.fmt.max_completion_tokens)
        self.rounds += 1
        for tracker, lp_out, ids, new_lps in zip(trackers, logprobs, completions, lps):
            self._feed(tracker, lp_out, ids, new_lps)

    def _sample_by_thought(self, contexts, trackers, logprobs) -> None:
        stop = {"stop": [self.fmt.boundary], "include_stop_str_in_output": True}
        per_round = min(self.fmt.max_thought_tokens, self.fmt.max_completion_tokens)
        while True:
            active = [i for i, t in enumerate(trackers) if not t.done]
            if not self.sync_any(bool(active)):
                return
            prompts = [list(contexts[i]) + trackers[i].tokens for i in active]
            completions, lps = self._request(prompts, per_round, extra=stop)
            self.rounds += 1
            for i, ids, new_lps in zip(active, completions, lps):
                if not ids:  # the engine gave nothing back: end the row rather than loop forever
                    trackers[i].finish()
                    continue
                self._feed(trackers[i], logprobs[i], ids, new_lps)

    def complete(self, prompts, max_new_tokens, temperature) -> list[list[int]]:
        completions, _ = self._request([list(p) for p in prompts], max_new_tokens, temperature=temperature)
        replies = []
        for row in completions:
            cut = next((j + 1 for j, tok in enumerate(row) if tok in self.eos_ids), len(row))
            replies.append(row[:cut])
        self.generated_tokens += sum(len(r) for r in replies)
        return replies
