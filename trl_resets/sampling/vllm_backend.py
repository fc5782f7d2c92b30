"""Thought-level sampling on the vLLM engine that TRL's wrapper (`trl.generation.vllm_generation`) starts.

Two ways to drive the engine, both sampling exactly the thought-by-thought distribution (every
token is drawn from the exact token ids before it, and where a rollout stops is a function of those
ids alone, so cutting a longer draw at the stop point changes nothing):

* **per-thought rounds** (only when the engine caches prefixes): each round asks for one more
  thought per unfinished row, stopping at the thought boundary; the next round's prompt is the
  previous prompt plus the tokens just sampled, which the prefix cache mostly holds (vLLM caches
  whole blocks, so each round re-encodes at most the last partial block). Rows stop as soon as
  their tracker says so (final answer, caps).
* **one pass** (prefix caching off or unknown): a single request per rollout for its remaining
  token budget, cut afterwards by the same tracker. Nothing is re-encoded; tokens drawn after the
  stop point are discarded (counted in ``discarded_tokens``).

Every request asks for at most the row's remaining budget and is checked against the engine's
``max_model_len`` before it is sent. ``generation_kwargs`` entries that would override the
package's own settings, or that count only the tokens of one request (and so restart with every
round and every reset suffix), are refused (`check_vllm_generation_kwargs`); a ``seed`` becomes one
seed per row, derived from it.

Modes: ``colocate`` calls the process's own ``vllm.LLM`` with one ``SamplingParams`` per row;
``server`` gathers every process's requests, sends them from the main process through the
wrapper's ``VLLMClient`` (one call per distinct token budget and temperature), and hands each
process its own completions back, so processes may have different numbers of unfinished rows in a
round. A decoding stream's step is one wave: its rollouts' requests (new draws and reset suffixes,
whatever their budgets) and its localization replies go to the engine together, in one ``generate``
call (colocate) or as server calls all in flight at once, which the server schedules together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from trl.generation import vllm_generation

from ..thoughts import Rollout, ThoughtFormat, ThoughtTracker
from .base import DecodeRequest, ThoughtDecoding, derive_seed

# generation_kwargs entries the package sets itself (or that contradict its config), with the fix.
_OWN_SETTINGS = {
    "temperature": "set GRPOConfig.temperature instead",
    "top_p": "set GRPOConfig.top_p instead",
    "top_k": "set GRPOConfig.top_k instead",
    "min_p": "set GRPOConfig.min_p instead",
    "repetition_penalty": "set GRPOConfig.repetition_penalty instead",
    "max_tokens": "set max_completion_length (and max_thought_tokens) instead: every request asks for the row's "
                  "remaining budget",
    "n": "set num_generations and the split sizes instead: the package sends one request per rollout",
    "best_of": "unset it: the package sends one request per rollout and keeps every sample",
    "logprobs": "unset it: the package always asks for the sampled token's logprob",
    "stop": "unset it: rollouts stop at the thought caps, the final answer and EOS",
    "stop_token_ids": "unset it, or make the token an EOS token of the model's generation config",
    "include_stop_str_in_output": "unset it: per-thought rounds set it themselves",
    "skip_special_tokens": "unset it: per-thought rounds set it themselves (stop strings are matched on text with "
                           "special tokens kept, as the thought tracker decodes)",
    "ignore_eos": "unset it: rollouts end at EOS",
    "detokenize": "unset it: thought boundaries are found as stop strings in the decoded text",
    "structured_outputs": "unset it: a constraint would be applied to each per-thought round and to each reset "
                          "suffix separately",
    "guided_decoding": "unset it: a constraint would be applied to each per-thought round and to each reset suffix "
                       "separately",
    "truncate_prompt_tokens": "unset it: a truncated context is not the rollout's context",
    "trace_decode_token_ids": "unset it: it replaces sampling with given tokens",
    "flat_logprobs": "unset it: the package reads logprobs per token",
    "output_kind": "unset it: the package reads final outputs",
}
# Options vLLM applies to the tokens generated in one request only: they restart with every per-thought
# round and ignore a reset prefix (which reaches the engine as prompt), so the samples would not follow the
# one-pass distribution.
_PER_REQUEST_STATE = ("min_tokens", "presence_penalty", "frequency_penalty", "thinking_token_budget",
                      "repetition_detection", "bad_words")


def check_vllm_generation_kwargs(generation_kwargs: dict | None, mode: str) -> None:
    """Refuses every ``generation_kwargs`` entry the vLLM backends cannot honour (see the module docstring)."""
    for key in generation_kwargs or {}:
        if key in _OWN_SETTINGS:
            raise ValueError(
                f"generation_kwargs[{key!r}] is not supported with use_vllm=True: it would override the sampling "
                f"settings trl-resets sends with every request. Fix: {_OWN_SETTINGS[key]}."
            )
        if key in _PER_REQUEST_STATE:
            raise ValueError(
                f"generation_kwargs[{key!r}] is not supported with use_vllm=True: vLLM applies it to the tokens of "
                "one request only, and a rollout is sampled over several requests (one per thought, and a reset "
                "suffix after its prefix), so it would restart each time. Fix: unset it (repetition_penalty, "
                "which counts the prompt too, is honoured)."
            )
    if mode == "server" and (generation_kwargs or {}).get("seed") is not None:
        raise ValueError(
            "generation_kwargs['seed'] is not supported with vllm_mode='server': the server applies one seed to "
            "every prompt of a request, and the package sends one prompt per rollout, so every rollout of a "
            "context would be identical (zero-variance groups). Fix: unset it; seed the server with `vllm serve "
            "--seed N` instead, or use vllm_mode='colocate', where the seed is turned into one seed per row."
        )


def row_seed(seed: int, process_index: int, row: int) -> int:
    """The seed of the ``row``-th seeded request of a process: distinct per row and process, fixed by ``seed``."""
    return derive_seed(seed, process_index, row)


def sampled_logprob(token_ids: list[int] | None, logprobs: list | None, token: int) -> float:
    """The logprob of ``token`` among one position's entries (TRL's ranked lists); NaN when it is not there."""
    for candidate, value in zip(token_ids or [], logprobs or []):
        if candidate == token:
            return float("nan") if value is None else float(value)
    return float("nan")


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


def max_model_len(engine) -> int | None:
    """The longest prompt + completion the engine accepts (None when it cannot be told, e.g. off the main process)."""
    try:
        if engine.mode == "colocate":
            return int(engine.llm.llm_engine.vllm_config.model_config.max_model_len)
        client = getattr(engine, "vllm_client", None)
        if client is None:
            return None
        return int(client.get_server_info()["model_config"]["max_model_len"])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        return None


def length_error(rows: list[tuple[str, int, int]], limit: int | None, mode: str) -> str | None:
    """The error for the first ``(row name, prompt length, max new tokens)`` past ``limit``; None when all fit."""
    if limit is None:
        return None
    for name, prompt_len, max_tokens in rows:
        if prompt_len + max_tokens > limit:
            flag = "vllm_max_model_length" if mode == "colocate" else "the server's --max-model-len"
            outcome = "reject the whole batch" if mode == "server" else "cut it short"
            return (
                f"{name}: a prompt of {prompt_len} tokens plus up to {max_tokens} new tokens exceeds the vLLM "
                f"engine's max_model_len={limit} (vLLM would {outcome}). "
                f"Fix: raise {flag} to at least {prompt_len + max_tokens}, or shorten the prompts or "
                "max_completion_length (localization_max_tokens for a localization prompt)."
            )
    return None


@dataclass
class _Batch:
    """Requests of one kind sent in a wave (`VLLMThoughtSampler._wave`): prompts, a token budget per prompt, the
    temperature (one, a list with one per prompt, or None: the config's), extra sampling settings (stop strings),
    the kind named in length errors, and each request's own seed (colocate mode; None: unseeded)."""

    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float | list[float | None] | None = None
    extra: dict | None = None
    kind: str = "rollout"
    seeds: list[int | None] | None = None

    def __post_init__(self):
        self.extra = self.extra or {}

    @property
    def temperatures(self) -> list[float | None]:
        if isinstance(self.temperature, list):
            return self.temperature
        return [self.temperature] * len(self.prompts)


def _split(completions: list, logprobs: list, sizes: list[int]) -> list[tuple[list, list]]:
    """Consecutive slices of ``sizes`` rows, one per batch."""
    out, start = [], 0
    for size in sizes:
        out.append((completions[start:start + size], logprobs[start:start + size]))
        start += size
    return out


class VLLMThoughtSampler(ThoughtDecoding):
    """`ThoughtSampler` over TRL's ``VLLMGeneration`` (``use_vllm=True``, colocate or server).

    Args:
        engine: the trainer's ``VLLMGeneration`` (weights already synced by the trainer).
        tokenizer: the policy's tokenizer (``decode`` for boundary detection).
        fmt: the thought format.
        eos_ids: tokens that end a rollout (vLLM stops at the generation config's EOS tokens too: pass them all).
        per_thought: per-thought rounds (needs prefix caching) or one pass; see the module docstring.
        sync_any: ``flag -> any process's flag``; keeps processes in the same number of rounds.
        gather: ``local list -> list of every process's lists`` (server mode).
        broadcast: ``object on the main process -> that object everywhere`` (server mode).
        is_main_process: whether this process talks to the server.
        process_index: this process's rank (server mode slicing, per-row seeds).
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
        check_vllm_generation_kwargs(engine.generation_kwargs, engine.mode)
        super().__init__(tokenizer, fmt, eos_ids)
        self.engine = engine
        self.per_thought = per_thought
        self.sync_any = sync_any
        self.gather = gather or (lambda items: [items])
        self.broadcast = broadcast or (lambda obj: obj)
        self.is_main_process = is_main_process
        self.process_index = process_index
        self.discarded_tokens = 0
        self.rounds = 0
        self._max_model_len: int | None = None
        self._limit_known = False

    # ------------------------------------------------------------------ engine calls
    def _settings(self, max_tokens: int, temperature: float | None) -> dict:
        """The package's own sampling settings for one request (TRL's config values, this request's budget)."""
        engine = self.engine
        return {
            "n": 1,
            "repetition_penalty": engine.repetition_penalty,
            "temperature": engine.temperature if temperature is None else temperature,
            "top_p": engine.top_p,
            "top_k": engine.top_k,
            "min_p": 0.0 if engine.min_p is None else engine.min_p,
            "max_tokens": max_tokens,
            "logprobs": engine.logprobs,
        }

    def _next_row_seeds(self, count: int) -> list[int | None]:
        """One derived seed per row when the user set ``generation_kwargs['seed']`` (the count lives on the engine,
        so seeds keep changing across training steps, whose samplers are new objects)."""
        seed = (self.engine.generation_kwargs or {}).get("seed")
        if seed is None:
            return [None] * count
        start = getattr(self.engine, "_trl_resets_seeded_rows", 0)
        self.engine._trl_resets_seeded_rows = start + count
        return [row_seed(seed, self.process_index, start + k) for k in range(count)]

    def _limit(self) -> int | None:
        if not self._limit_known:
            found = max_model_len(self.engine) if self.is_main_process or self.engine.mode == "colocate" else None
            self._max_model_len = self.broadcast(found) if self.engine.mode == "server" else found
            self._limit_known = True
        return self._max_model_len

    def _check_lengths(self, lengths: list[int], max_tokens: list[int], kind: str) -> None:
        """Raises when a row's prompt plus budget exceeds the engine's ``max_model_len`` (server: on every process)."""
        where = f" of process {self.process_index}" if self.engine.mode == "server" else ""
        rows = [(f"{kind} row {i}{where}", n, m) for i, (n, m) in enumerate(zip(lengths, max_tokens))]
        error = length_error(rows, self._limit(), self.engine.mode)
        failed = error is not None
        if self.engine.mode == "server":  # processes request together: all stop, not only the one whose row is long
            failed = self.sync_any(failed)
        if failed:
            raise ValueError(error or "a request of another process exceeds the vLLM engine's max_model_len; "
                                      "see that process's error for the row and the fix.")

    def _request(self, prompts: list[list[int]], max_tokens: list[int], temperature=None, extra=None, kind="rollout",
                 seeds: list[int | None] | None = None):
        """Completion ids and sampled-token logprobs per prompt (one completion each, ``max_tokens[i]`` at most);
        ``temperature``: one for every row, or a list with one per row (None: the config's). ``seeds``: each
        request's own seed (colocate only; None: derived from ``generation_kwargs['seed']`` when set)."""
        return self._wave([_Batch(prompts, max_tokens, temperature, extra, kind, seeds)])[0]

    def _wave(self, batches: list[_Batch]) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Each batch's completions and logprobs (as `_request`), all decoded in one wave of the engine: colocate
        mode makes one ``LLM.generate`` call with one ``SamplingParams`` per row; server mode sends the calls the
        server needs (one per batch, token budget and temperature) at the same time, so that the server schedules
        them together rather than one after another. Every process makes the same collective calls."""
        for batch in batches:
            self._check_lengths([len(p) for p in batch.prompts], batch.max_tokens, batch.kind)
        if self.engine.mode == "server":
            if any(seed is not None for batch in batches for seed in batch.seeds or []):
                raise ValueError(
                    "requests with seeds of their own cannot go to a vLLM server, which applies one seed to every "
                    "prompt of a call. Use vllm_mode='colocate', or turn per_row_sampling_seed off.")
            return self._wave_server(batches)
        user = self.engine.generation_kwargs or {}
        prompts, params = [], []
        for batch in batches:
            seeds = batch.seeds or self._next_row_seeds(len(batch.prompts))
            prompts += [list(p) for p in batch.prompts]
            params += [  # vLLM's SamplingParams, as TRL's wrapper imports it
                vllm_generation.SamplingParams(**self._settings(m, t), **{**user, **batch.extra, "seed": seed})
                for m, t, seed in zip(batch.max_tokens, batch.temperatures, seeds)
            ]
        completions, logprobs = [], []
        outputs = self.engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params,
                                           use_tqdm=False) if prompts else []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            completions.append(ids)
            if sample.logprobs is None:
                logprobs.append([float("nan")] * len(ids))
            else:
                logprobs.append([_logprob_of(entry, token) for entry, token in zip(sample.logprobs, ids)])
        return _split(completions, logprobs, [len(batch.prompts) for batch in batches])

    def _wave_server(self, batches: list[_Batch]):
        everyone = self.gather([(b, list(p), m, t) for b, batch in enumerate(batches)
                                for p, m, t in zip(batch.prompts, batch.max_tokens, batch.temperatures)])
        payload = None
        if self.is_main_process:
            flat = [row for part in everyone for row in part]
            # one call per batch, budget and temperature: the server applies one of each (and one set of stop
            # strings) to a call
            keys = sorted({(b, m, t) for b, _, m, t in flat}, key=lambda k: (k[0], k[1], k[2] is None, k[2]))
            where = [[j for j, (b, _, m, t) in enumerate(flat) if (b, m, t) == key] for key in keys]
            calls = [([flat[j][1] for j in rows], m, t, batches[b].extra) for (b, m, t), rows in zip(keys, where)]
            completions, logprobs = [None] * len(flat), [None] * len(flat)
            for rows, (ids, lps) in zip(where, self._send_together(calls)):
                for j, row_ids, row_lps in zip(rows, ids, lps):
                    completions[j], logprobs[j] = row_ids, row_lps
            payload = (completions, logprobs, [len(part) for part in everyone])
        completions, logprobs, sizes = self.broadcast(payload)
        start = sum(sizes[: self.process_index])
        end = start + sizes[self.process_index]
        return _split(completions[start:end], logprobs[start:end], [len(batch.prompts) for batch in batches])

    def _send_together(self, calls: list[tuple]) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Each server call's results; several calls are in flight at once (as TRL's client sends its per-prompt
        requests), so the server's scheduler decodes them in the same steps."""
        if len(calls) <= 1:
            return [self._call_server(*call) for call in calls]
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(lambda call: self._call_server(*call), calls))

    def _call_server(self, prompts, max_tokens, temperature, extra):
        out = self.engine.vllm_client.generate(
            prompts=prompts,
            **self._settings(max_tokens, temperature),
            generation_kwargs={**(self.engine.generation_kwargs or {}), **extra},
        )
        completions = [list(ids) for ids in out["completion_ids"]]
        raw, raw_ids = out.get("logprobs"), out.get("logprob_token_ids")
        if raw is None or raw_ids is None:
            return completions, [[float("nan")] * len(ids) for ids in completions]
        logprobs = [
            [sampled_logprob(position_ids, position_lps, token) for token, position_ids, position_lps in
             zip(ids, row_ids, row_lps)]
            for ids, row_ids, row_lps in zip(completions, raw_ids, raw)
        ]
        return completions, logprobs

    # ------------------------------------------------------------------ ThoughtSampler
    def stream(self) -> _VLLMStream:
        """A `DecodingStream`: new rollouts join the next per-thought round (one pass: they are sent at once)."""
        return _VLLMStream(self)

    def sample(self, contexts, start_thoughts=None, token_budgets=None) -> list[Rollout]:
        n = len(contexts)
        start_thoughts = start_thoughts or [0] * n
        token_budgets = token_budgets or [self.fmt.max_completion_tokens] * n
        trackers = [self._tracker(start_thoughts[i], token_budgets[i]) for i in range(n)]
        # every request of a rollout fits when its context plus its whole budget does: fail before the first one
        self._check_lengths([len(c) for c in contexts], [t.token_budget for t in trackers], "rollout")
        logprobs: list[list[float]] = [[] for _ in range(n)]
        if self.per_thought:
            self._sample_by_thought(contexts, trackers, logprobs)
        else:
            self._sample_one_pass(contexts, trackers, logprobs)
        return [self._rollout(tracker, lps) for tracker, lps in zip(trackers, logprobs)]

    def _feed(self, tracker: ThoughtTracker, lps: list[float], ids: list[int], new_lps: list[float]) -> None:
        for position, token in enumerate(ids):
            if tracker.done:
                self.discarded_tokens += len(ids) - position
                return
            tracker.push(token)
            lps.append(new_lps[position] if position < len(new_lps) else float("nan"))

    def _sample_one_pass(self, contexts, trackers, logprobs) -> None:
        budgets = [t.token_budget for t in trackers]
        completions, lps = self._request([list(c) for c in contexts], budgets)
        self.rounds += 1
        for tracker, lp_out, ids, new_lps in zip(trackers, logprobs, completions, lps):
            self._feed(tracker, lp_out, ids, new_lps)

    def _sample_by_thought(self, contexts, trackers, logprobs) -> None:
        while True:
            active = [i for i, t in enumerate(trackers) if not t.done]
            if not self.sync_any(bool(active)):
                return
            self._thought_round([contexts[i] for i in active], [trackers[i] for i in active],
                                [logprobs[i] for i in active])

    def _thought_round(self, contexts, trackers, logprobs, seeds=None) -> None:
        """One request per row for its next thought, stopping at the thought boundary (or the row's budget);
        ``seeds``: each row's own seed (None: unseeded), from which each of its requests derives one."""
        (result,) = self._wave([self._round_batch(contexts, trackers, seeds)])
        self._take_round(trackers, logprobs, *result)

    def _round_batch(self, contexts, trackers, seeds=None) -> _Batch:
        # Stop strings are matched on the decoded completion; keep special tokens in it, as the tracker does.
        stop = {"stop": [self.fmt.boundary], "include_stop_str_in_output": True, "skip_special_tokens": False}
        prompts = [list(context) + tracker.tokens for context, tracker in zip(contexts, trackers)]
        budgets = [min(self.fmt.max_thought_tokens, t.token_budget - len(t.tokens)) for t in trackers]
        return _Batch(prompts, budgets, extra=stop, seeds=_round_seeds(seeds, trackers))

    def _take_round(self, trackers, logprobs, completions, lps) -> None:
        self.rounds += 1
        for tracker, lp_out, ids, new_lps in zip(trackers, logprobs, completions, lps):
            if not ids:  # the engine gave nothing back: end the row rather than loop forever
                tracker.finish()
                continue
            self._feed(tracker, lp_out, ids, new_lps)

    def complete(self, prompts, max_new_tokens, temperature) -> list[list[int]]:
        return self._replies([list(p) for p in prompts], [max_new_tokens] * len(prompts), temperature)

    def _replies(self, prompts, max_new_tokens: list[int], temperature, seeds=None) -> list[list[int]]:
        """Free replies, each cut after its first EOS."""
        (result,) = self._wave([self._reply_batch(prompts, max_new_tokens, temperature, seeds)])
        return self._cut_replies(result[0])

    @staticmethod
    def _reply_batch(prompts, max_new_tokens: list[int], temperature, seeds=None) -> _Batch:
        return _Batch(prompts, max_new_tokens, temperature, kind="localization", seeds=seeds)

    def _cut_replies(self, completions) -> list[list[int]]:
        replies = []
        for row in completions:
            cut = next((j + 1 for j, tok in enumerate(row) if tok in self.eos_ids), len(row))
            replies.append(row[:cut])
        return replies

    def _rollout(self, tracker: ThoughtTracker, logprobs: list[float]) -> Rollout:
        tracker.finish()
        return Rollout(list(tracker.tokens), list(tracker.spans), tracker.stop_reason, logprobs[: len(tracker.tokens)])


class _VLLMStream:
    """`DecodingStream` over the vLLM sampler. Per-thought rounds: each step is one round, in which every unfinished
    rollout asks for its next thought; rollouts submitted since the last step join that round, so a reset suffix
    starts while other rollouts are mid-chain. One pass: each step sends everything submitted since the last one,
    each rollout for its whole budget. Localization replies (no stop strings) go out in the same wave as the
    rollouts' requests (`VLLMThoughtSampler._wave`). The steps are collective: every process makes the same requests
    calls, as in `sample`.

    A request with a seed (`DecodeRequest.seed`, colocate mode) sends it to vLLM as its per-request seed; a rollout's
    later per-thought rounds send seeds derived from it and the tokens it has so far, so its tokens follow from its
    seed alone, whatever other rows share the engine's calls."""

    collective = True

    def __init__(self, sampler: VLLMThoughtSampler):
        self.sampler = sampler
        # handle, tracker, logprobs, context, seed
        self.rows: list[tuple[int, ThoughtTracker, list[float], list[int], int | None]] = []
        self.joining: list[tuple[int, DecodeRequest]] = []
        self.replies: list[tuple[int, DecodeRequest]] = []
        self.handles = 0

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.joining or self.replies)

    def submit(self, requests: list[DecodeRequest]) -> list[int]:
        handles = list(range(self.handles, self.handles + len(requests)))
        self.handles += len(requests)
        for handle, request in zip(handles, requests):
            (self.replies if request.is_reply else self.joining).append((handle, request))
        return handles

    def step(self) -> list[tuple[int, Rollout | list[int]]]:
        s = self.sampler
        joining, self.joining = self.joining, []
        trackers = [s._tracker(r.start_thoughts, r.token_budget) for _, r in joining]
        # every request of a rollout fits when its context plus its whole budget does: fail before the first one
        s._check_lengths([len(r.context) for _, r in joining], [t.token_budget for t in trackers], "rollout")
        self.rows += [(h, t, [], list(r.context), r.seed) for (h, r), t in zip(joining, trackers)]
        replies, self.replies = self.replies, []
        # the rollouts' requests and the replies go out in one wave
        reply_batch = s._reply_batch([list(r.context) for _, r in replies], [r.reply_tokens for _, r in replies],
                                     [r.temperature for _, r in replies], _seeds_or_none([r.seed for _, r in replies]))
        if s.per_thought:
            live = [row for row in self.rows if not row[1].done]
            trackers = [row[1] for row in live]
            rollouts, answered = s._wave([s._round_batch([row[3] for row in live], trackers, [row[4] for row in live]),
                                          reply_batch])
            s._take_round(trackers, [row[2] for row in live], *rollouts)
        else:
            batch = _Batch([row[3] for row in self.rows], [row[1].token_budget for row in self.rows],
                           seeds=_round_seeds([row[4] for row in self.rows], [row[1] for row in self.rows]))
            (completions, lps), answered = s._wave([batch, reply_batch])
            s.rounds += 1
            for (_, tracker, lp_out, _, _), ids, new_lps in zip(self.rows, completions, lps):
                s._feed(tracker, lp_out, ids, new_lps)
                tracker.finish()
        done = [(h, s._rollout(t, lps)) for h, t, lps, _, _ in self.rows if t.done]
        self.rows = [row for row in self.rows if not row[1].done]
        return done + list(zip([h for h, _ in replies], s._cut_replies(answered[0])))


def _seeds_or_none(seeds: list[int | None]) -> list[int | None] | None:
    """Per-request seeds, or None when no request has one (the engine's own seeding then applies)."""
    return seeds if any(seed is not None for seed in seeds) else None


def _round_seeds(seeds: list[int | None] | None, trackers: list[ThoughtTracker]) -> list[int | None] | None:
    """The seed of each rollout's next request: derived from the rollout's own seed and the tokens it has so far,
    so that each of its requests draws anew and the whole follows from its seed alone."""
    if seeds is None:
        return None
    return _seeds_or_none([None if seed is None else derive_seed(seed, len(tracker.tokens))
                           for seed, tracker in zip(seeds, trackers)])


def _logprob_of(entry: dict, token: int) -> float:
    """The sampled token's logprob from one position of a vLLM output (``{token id: Logprob}``); NaN when absent."""
    found = entry.get(token) if entry else None
    if found is None or found.logprob is None or math.isnan(found.logprob):
        return float("nan")
    return float(found.logprob)
