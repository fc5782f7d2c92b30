"""Thought-level sampling with transformers models: one decoding pass per rollout, every cap enforced while decoding.

Compact decoding (the default) is the sampler's own decoding loop, a `DecodingStream`
(`TransformersThoughtSampler.stream`). The KV cache runs across thoughts and a `ThoughtTracker` follows each row, so
a rollout is sampled exactly as thought-by-thought prompting would sample it, with nothing re-encoded between
thoughts. A row, and its slice of the KV cache, leaves the batch as soon as it stops, so the work follows the tokens
actually drawn, not rows x the longest row; this matters most where a decoding step costs in proportion to its rows
(a CPU) and where rollout lengths vary (a group's failures stop early; suffixes are shorter than rollouts).
Requests may join while others decode: their contexts are prefilled together and their KV cache is merged into the
running batch's, so the reset algorithm's localization replies and suffixes (`scheduler.run_overlapped`) decode in
the same forward passes as the rollouts still running. ``sample`` and ``complete`` submit their rows at once and
step the stream until it is done. The logits processors are the ones ``generate`` builds for the same config, and
the tokens are drawn the same way (softmax then one ``multinomial`` per step, or argmax), so until a row stops the
draws equal ``generate``'s.

Rows that share a context (a group's rollouts of one prompt, the suffixes of one reset prefix) share its prefill:
each distinct context is encoded once and its KV cache is copied to its rows, as vLLM's prefix caching does. (A
model sampled in training mode with dropout draws one dropout mask for a shared prefill instead of one per row; the
trainer samples in eval mode, see `sampling_weights`.)

With ``compact_decoding=False``, and for configs whose processors keep per-row state (repetition penalty, minimum
lengths, ...), prompt-learning adapters and models with recurrent layers (linear attention, state-space: NemotronH,
...), rollouts are decoded by transformers' ``generate`` with a stopping criterion per row (with a warning where the
compact loop was asked for); ``generate`` computes every row of a batch until the last one stops.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.generation import logits_process as _lp

from ..thoughts import Rollout, ThoughtFormat
from .base import DecodeRequest, PhasedStream, ThoughtDecoding, decode


def _mergeable_lora_layers(model):
    """The LoRA layers of a PEFT ``model`` as (layer, active adapters), or a reason they cannot be merged exactly
    by `sampling_weights` (a layer kind other than a plain float Linear, DoRA or another variant, LoRA biases)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None, "peft is missing"
    if not isinstance(model, PeftModel):
        return None, "the model has no PEFT adapter"
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    layers = []
    for name, module in model.named_modules():
        if type(module).__name__ in ("ModulesToSaveWrapper", "TrainableTokensWrapper"):
            # disabling the adapter would also swap these trained copies back to the originals
            return None, f"{name} is a {type(module).__name__} (modules_to_save / trainable tokens)"
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters or module.disable_adapters:
            continue
        base = module.get_base_layer()
        if type(module) is not LoraLinear or type(base) is not torch.nn.Linear:
            return None, f"{name} is a {type(module).__name__} over a {type(base).__name__}"
        if uses.get(id(base.weight), 0) > 1:
            return None, f"{name}'s base weight is tied to another module"
        if not base.weight.dtype.is_floating_point or module.merged:
            return None, f"{name} has a {base.weight.dtype} base weight" if not module.merged else f"{name} is merged"
        for adapter in adapters:
            if module.use_dora.get(adapter) or getattr(module, "lora_variant", {}).get(adapter) or \
                    getattr(module, "lora_bias", {}).get(adapter):
                return None, f"{name} uses DoRA, a LoRA variant or a LoRA bias"
        layers.append((module, adapters))
    return layers, None


@contextmanager
def sampling_weights(model, merge: bool = True):
    """The policy as it samples: in eval mode (no dropout, as vLLM samples), and with its LoRA adapters merged
    into the base weights when ``merge`` and every adapter layer allows an exact merge.

    Merging swaps each base weight for ``weight + delta`` and bypasses the adapter branches, so a decoding step
    runs one matmul per Linear instead of three. The original weight tensors are put back afterwards, bit for
    bit (no unmerge arithmetic, so no drift over many steps); the merged copies cost one copy of the adapted
    weights while sampling. Yields whether the adapters were merged.
    """
    was_training = model.training
    layers, reason = _mergeable_lora_layers(model) if merge else (None, None)
    if merge and layers is None and reason != "the model has no PEFT adapter":
        _warn_once(f"sampling with unmerged LoRA adapters: {reason}.")
    originals = []
    model.eval()
    try:
        if layers:
            with torch.no_grad():
                for module, adapters in layers:
                    weight = module.get_base_layer().weight
                    merged = weight.data.clone()
                    for adapter in adapters:
                        merged += module.get_delta_weight(adapter).to(merged.dtype)
                    originals.append((weight, weight.data))
                    weight.data = merged
            with model.disable_adapter():
                yield True
        else:
            yield False
    finally:
        for weight, data in originals:
            weight.data = data
        model.train(was_training)


class _StopRows(StoppingCriteria):
    """For ``generate``: feeds each running row's newest token to ``stop(row, token)`` and records the length at
    which the row stopped (``stop`` is called once per token of a row, never after it stopped)."""

    def __init__(self, stop, rows: int):
        self.stop = stop
        self.lengths: list[int | None] = [None] * rows
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.lengths[row] is None and self.stop(row, token):
                self.lengths[row] = self.steps
        return torch.tensor([n is not None for n in self.lengths], dtype=torch.bool, device=input_ids.device)


# Processors that see only the scores (and the ids so far, which compaction keeps row-aligned): safe for a batch
# whose rows come and go. Anything else ``generate`` would build sends the call to ``generate``.
_ROW_SAFE_PROCESSORS = tuple(
    getattr(_lp, name) for name in (
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
        "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper", "InfNanRemoveLogitsProcessor",
        "LogitNormalization", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
        "SuppressTokensLogitsProcessor",
    ) if hasattr(_lp, name)
)


def _holds_recurrent_state(model) -> bool:
    """Whether the model's cache has layers with recurrent state (linear attention, state-space models), whose rows
    the compact decoder could neither drop (``batch_select_indices``) nor copy to the rows of a shared prefill."""
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in DynamicCache(config=model.config).layers)


def _warn_once(message: str) -> None:
    # No set of our own: Python's default filter already shows a given UserWarning once per call site, and a
    # caller that records warnings (``pytest.warns``, ``catch_warnings``) sees it each time, whatever ran before.
    warnings.warn(message, stacklevel=3)


def cache_kwarg(model) -> str:
    """The keyword under which ``model``'s forward (and ``generate``) take the KV cache: ``cache`` from
    transformers 5.24 on, where ``past_key_values`` became a deprecated alias, ``past_key_values`` before.

    Read from the first ``forward`` in the class hierarchy of the (PEFT-unwrapped) model that names either, so
    a subclass whose forward takes ``**kwargs`` follows its parent. A model whose forward names neither is an
    error: the sampler must hand the cache over by name, and a wrong name would be dropped into ``**kwargs``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for cls in type(base).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        params = inspect.signature(forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    raise TypeError(
        f"{type(base).__name__}.forward takes neither `cache` nor `past_key_values`: the thought sampler cannot "
        "hand it a KV cache. Use a transformers causal LM with a cache argument."
    )


def _distinct(contexts: list[list[int]]) -> tuple[list[int], list[int]]:
    """(leaders, rows): the first row of each distinct context, and for every row the index of its context
    among the leaders, found in one pass."""
    group_of: dict[tuple, int] = {}
    leaders, rows = [], []
    for i, context in enumerate(contexts):
        key = tuple(context)
        if key not in group_of:
            group_of[key] = len(leaders)
            leaders.append(i)
        rows.append(group_of[key])
    return leaders, rows


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


class TransformersThoughtSampler(ThoughtDecoding):
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
        compact: decode with the sampler's own loop, which drops each row from the batch (and the KV cache)
            as soon as it stops; ``False`` uses ``generate``. Off for collective decoding.
        share_prompt_prefix: in the compact decoder, encode the tokens that every distinct context of a prefill
            starts with (a system prompt, an instruction template) once, and only each context's remainder per
            row; the rows' padding then sits between the prefix and the remainder, masked. Off by default: the
            rows' logits equal the unshared ones only up to float rounding. Needs ``share_prefill``.
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
        compact: bool = True,
        share_prompt_prefix: bool = False,
        record_logprobs: bool = False,
    ):
        super().__init__(tokenizer, fmt, eos_ids)
        # the compact decoder's rollouts then carry each token's log-probability under the sampling policy, as the
        # loss computes it (log-softmax of the logits over the temperature; no top-p/top-k truncation)
        self.record_logprobs = record_logprobs
        self.model = model
        self.generation_config = generation_config or GenerationConfig(do_sample=True)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.batch_size = batch_size
        self.collective = collective
        self.share_prefill = share_prefill and not collective
        self.compact = compact and not collective
        if share_prompt_prefix and not share_prefill:
            raise ValueError("share_prompt_prefix=True needs share_prefill=True (a shared prefix is a shared prefill);"
                             " turn both on or both off.")
        self.share_prompt_prefix = share_prompt_prefix
        if (self.share_prefill or self.compact) and _holds_recurrent_state(model):
            _warn_once("compact decoding and prefill sharing are off for a model with recurrent layers (linear "
                       "attention or state-space: their cache cannot give up or copy single rows); sampling with "
                       "transformers' generate instead.")
            self.share_prefill = self.compact = self.share_prompt_prefix = False
        self.share_prompt_prefix = self.share_prompt_prefix and self.share_prefill
        self.generate_calls = 0  # calls that went to `generate` although compact decoding was asked for

    def _chunks(self, n: int):
        step = self.batch_size or max(n, 1)
        return [range(i, min(i + step, n)) for i in range(0, n, step)]

    def _config(self, settings: dict) -> GenerationConfig:
        config = copy.deepcopy(self.generation_config)
        for key, value in settings.items():
            setattr(config, key, value)
        config.pad_token_id = self.pad_id
        return config

    def _run(self, contexts: list[list[int]], settings: dict, stop) -> list[list[int]]:
        """Each context's new tokens from ``generate``. ``stop(row, token)`` says whether row ``row`` ends with
        ``token``; no row goes past ``settings["max_new_tokens"]``."""
        criterion = _StopRows(stop, len(contexts))
        out = self._generate(contexts, self._config(settings), stopping_criteria=StoppingCriteriaList([criterion]))
        return [tokens[:length] for tokens, length in zip(out.tolist(), criterion.lengths)]

    def _settings(self, request: DecodeRequest) -> dict:
        """The generation settings that differ by request: a reply's temperature (0: greedy)."""
        if not request.is_reply:
            return {}
        if request.temperature > 0:
            return {"do_sample": True, "temperature": request.temperature}
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}

    def _serve_generate(self, requests: list[DecodeRequest]) -> list[Rollout | list[int]]:
        """Requests decoded with ``generate``, in chunks of ``batch_size`` rows per reply setting and for rollouts."""
        results: list = [None] * len(requests)
        kinds: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            kinds.setdefault(tuple(sorted(self._settings(request).items())), []).append(i)
        for key, members in kinds.items():
            for chunk in self._chunks(len(members)):
                rows = [_RowState(h, requests[h], self) for h in (members[j] for j in chunk)]
                budget = max(row.max_new for row in rows)
                self._run([requests[row.handle].context for row in rows], {**dict(key), "max_new_tokens": budget},
                          lambda b, token, rows=rows: rows[b].push(token))
                for row in rows:
                    results[row.handle] = row.result()
        return results

    def _serve(self, requests: list[DecodeRequest]) -> list[Rollout | list[int]]:
        if not self.compact:
            return self._serve_generate(requests)
        return decode(_CompactStream(self), requests)

    def stream(self):
        """A `DecodingStream`: the compact decoder, whose running batch takes new rows at every step; with compact
        decoding off (``compact=False``, collective decoding), one ``generate`` call per step (`PhasedStream`)."""
        return _CompactStream(self) if self.compact else PhasedStream(self)

    def _compact_processors(self, config: GenerationConfig, contexts):
        """The logits processors ``generate`` would build for ``config``, or None (use ``generate``, with a warning)
        when one of them keeps per-row state, the model is under a prompt-learning adapter, or a context is empty."""
        processors, reason = self._processors_or_reason(config, contexts)
        if processors is None:
            self.generate_calls += 1
            _warn_once(f"compact decoding is off for {reason}; sampling with transformers' generate instead.")
        return processors

    def _processors_or_reason(self, config: GenerationConfig, contexts):
        """(the compact decoder's logits processors for ``config``, None), or (None, why ``generate`` must decode)."""
        peft_config = getattr(self.model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            return None, "a prompt-learning adapter"
        if not all(contexts):
            return None, "an empty context"
        try:  # generate's own config resolution and processor list (private helpers of transformers 5)
            resolved, _ = self.model._prepare_generation_config(copy.deepcopy(config))
            processors = self.model._get_logits_processor(
                generation_config=resolved, input_ids_seq_length=max(len(c) for c in contexts),
                device=self.model.device,
            )
        except (AttributeError, TypeError, ValueError) as error:
            return None, f"this transformers version ({type(error).__name__}: {error})"
        unsafe = [type(p).__name__ for p in processors if not isinstance(p, _ROW_SAFE_PROCESSORS)]
        if unsafe or resolved.min_new_tokens or resolved.min_length:
            return None, f"logits processors that keep per-row state ({', '.join(unsafe) or 'minimum lengths'})"
        processors.do_sample = bool(resolved.do_sample)
        return processors, None

    def row_seed_refusal(self) -> str | None:
        """Why this sampler cannot draw each row from a generator of its own (`DecodeRequest.seed`), or None when it
        can: only the compact decoder can, and only for settings it decodes itself."""
        if not self.compact:
            return ("rows are decoded by transformers' generate, which draws every row from one generator (compact "
                    "decoding is off, or decoding is collective under ZeRO-3)")
        _, reason = self._processors_or_reason(self._config({"max_new_tokens": 1}), [[self.pad_id]])
        return None if reason is None else f"the compact decoder hands {reason} to transformers' generate"

    def _forward_kwargs(self) -> dict:
        """``logits_to_keep=1`` where the model takes it: the prefill needs only the last position's logits."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    def _no_router_logits(self) -> dict:
        """Sampling computes no loss: a mixture-of-experts model that returns router logits by default would
        compute its load-balancing loss at every decoding step, against an attention mask longer than the step."""
        return {"output_router_logits": False} if getattr(self.model.config, "output_router_logits", False) else {}

    def _generate(self, contexts: list[list[int]], config: GenerationConfig | dict, **overrides) -> torch.Tensor:
        """Plain ``generate`` over left-padded ``contexts`` (``config``: a GenerationConfig, or settings that
        override the sampler's); returns the new tokens, padded. Benchmarks call it as the plain baseline."""
        if isinstance(config, dict):
            config = self._config(config)
        ids, mask = _left_pad(contexts, self.pad_id, self.model.device)
        with torch.no_grad():
            cache = self._shared_prefill(contexts, ids, mask) if self.share_prefill else None
            if cache is not None:
                overrides[cache_kwarg(self.model)] = cache
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **overrides)
        return out[:, ids.shape[1]:]

    def _shared_prefill(self, contexts, ids: torch.Tensor, mask: torch.Tensor):
        """The KV cache of every row's context but its last token, each distinct context encoded once.

        ``generate`` then feeds only the last column. Positions follow the left padding exactly as
        ``generate`` numbers them, so the cache equals the one the rows' own prefill would build.
        Returns None (plain prefill) when no context repeats.
        """
        leaders, rows = _distinct(contexts)
        if len(leaders) == len(contexts) or ids.shape[1] < 2:
            return None
        head_ids, head_mask = ids[leaders, :-1], mask[leaders, :-1]
        positions = (head_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=head_ids, attention_mask=head_mask, position_ids=positions, use_cache=True,
                   **{cache_kwarg(self.model): cache}, **self._no_router_logits())
        cache.batch_select_indices(torch.tensor(rows, device=ids.device))
        return cache

    def _dummy_call(self) -> None:
        """Keeps collective decoding in step on a process with nothing to decode."""
        if self.collective:
            self._generate([[self.pad_id]], self._config({"max_new_tokens": 1, "do_sample": False}))

    def sample(self, contexts, start_thoughts=None, token_budgets=None) -> list[Rollout]:
        n = len(contexts)
        if n == 0:
            self._dummy_call()
            return []
        start_thoughts = start_thoughts or [0] * n
        token_budgets = token_budgets or [self.fmt.max_completion_tokens] * n
        return self._serve([DecodeRequest(list(c), s, b) for c, s, b in zip(contexts, start_thoughts, token_budgets)])

    def complete(self, prompts, max_new_tokens, temperature) -> list[list[int]]:
        if not prompts:
            self._dummy_call()
            return []
        return self._serve([DecodeRequest(list(p), reply_tokens=max_new_tokens, temperature=temperature)
                            for p in prompts])


class _RowState:
    """One request while it decodes: a rollout's thought tracker, or a reply's tokens (cut at EOS)."""

    def __init__(self, handle: int, request: DecodeRequest, sampler: TransformersThoughtSampler):
        self.handle, self.sampler = handle, sampler
        if request.is_reply:
            self.tracker, self.tokens, self.max_new = None, [], max(request.reply_tokens, 0)
        else:
            self.tracker = sampler._tracker(request.start_thoughts, request.token_budget)
            self.tokens, self.max_new = self.tracker.tokens, self.tracker.token_budget
        self.logprobs = [] if sampler.record_logprobs and self.tracker is not None else None
        self.generator = None  # the row's own, for a request with a seed
        if request.seed is not None:
            self.generator = torch.Generator(device=sampler.model.device).manual_seed(request.seed)

    def push(self, token: int) -> bool:
        """Feeds the row's next token; True once the row is done."""
        if self.tracker is not None:
            return self.tracker.push(token)
        if len(self.tokens) < self.max_new:
            self.tokens.append(int(token))
        return token in self.sampler.eos_ids or len(self.tokens) >= self.max_new

    def result(self) -> Rollout | list[int]:
        if self.tracker is None:
            return list(self.tokens)
        self.tracker.finish()
        logprobs = None if self.logprobs is None or len(self.logprobs) != len(self.tracker.tokens) else self.logprobs
        return Rollout(list(self.tracker.tokens), list(self.tracker.spans), self.tracker.stop_reason,
                       logprobs=logprobs)


class _CompactStream:
    """The compact decoder as a `DecodingStream`: one forward pass per step over the rows still running.

    A row that stops leaves the batch and its slice of the KV cache at once. Requests that join are prefilled
    together (each distinct context once, when prefill sharing is on), and their cache is merged into the running
    batch's, left-padded to a common width; positions follow each row's own context, as ``generate`` numbers them.
    Rollouts and replies share the forward passes; each kind's tokens are drawn with its own logits processors (the
    ones ``generate`` builds for its settings). A request whose processors keep per-row state, or whose context is
    empty, is decoded by ``generate`` instead (with a warning). Models whose cache layers are not plain
    ``DynamicLayer`` ones (sliding windows, ...) take new rows only between batches.

    Its forward passes are the process's own (collective decoding uses `PhasedStream`), so processes need not
    step together.
    """

    collective = False
    one_token_per_step = True  # its steps are sequential decoding steps (see `base.StepCounter`)

    def __init__(self, sampler: TransformersThoughtSampler):
        self.sampler, self.model = sampler, sampler.model
        self.queue: list[tuple[int, DecodeRequest]] = []
        self.handles = 0
        self.rows: list[_RowState] = []
        self.kinds: list[tuple] = []  # per batch row: its processors' key
        self.processors: dict[tuple, object] = {}
        self.cache = self.ids = self.mask = self.next_position = self.logits = None
        self.cache_name = cache_kwarg(self.model)
        self.extra = {**sampler._forward_kwargs(), **sampler._no_router_logits()}  # the prefill's
        self.step_extra = sampler._no_router_logits()  # a decoding step's
        self.mergeable = all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.model.config).layers)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.rows)

    def submit(self, requests: list[DecodeRequest]) -> list[int]:
        handles = list(range(self.handles, self.handles + len(requests)))
        self.handles += len(requests)
        self.queue.extend(zip(handles, requests))
        return handles

    def _processors(self, request: DecodeRequest):
        key = tuple(sorted(self.sampler._settings(request).items()))
        if key not in self.processors:
            config = self.sampler._config({**dict(key), "max_new_tokens": max(self.sampler.fmt.max_completion_tokens,
                                                                               1)})
            self.processors[key] = self.sampler._compact_processors(config, [request.context])
        return key, self.processors[key]

    @torch.no_grad()
    def step(self) -> list[tuple[int, Rollout | list[int]]]:
        finished = self._admit()
        if not self.rows:
            return finished
        tokens = self._draw()
        if self.sampler.record_logprobs:
            self._record_logprobs(tokens)
        keep = []
        for b, token in enumerate(tokens.tolist()):
            if self.rows[b].push(token):
                finished.append((self.rows[b].handle, self.rows[b].result()))
            else:
                keep.append(b)
        if not keep:
            self.rows, self.kinds = [], []
            self.cache = self.ids = self.mask = self.next_position = self.logits = None
            return finished
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        if len(keep) < len(self.rows):
            select = torch.tensor(keep, device=self.ids.device)
            self.cache.batch_select_indices(select)
            self.ids, self.mask, tokens = self.ids[select], self.mask[select], tokens[select]
            self.next_position = self.next_position[select]
            self.rows, self.kinds = [self.rows[b] for b in keep], [self.kinds[b] for b in keep]
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=self.next_position[:, None], use_cache=True, **{self.cache_name: self.cache},
                         **self.step_extra)
        self.logits = out.logits[:, -1].to(dtype=torch.float32)
        self.next_position = self.next_position + 1
        return finished

    def _record_logprobs(self, tokens: torch.Tensor) -> None:
        """Each rollout row's log-probability of its drawn token: log-softmax of the logits over the sampling
        temperature (as the loss computes the policy's)."""
        temperature = self.sampler.generation_config.temperature or 1.0
        values = torch.log_softmax(self.logits / temperature, dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
        for row, value in zip(self.rows, values):
            if row.logprobs is not None:
                row.logprobs.append(value)

    def _draw(self) -> torch.Tensor:
        """The next token of every running row, each kind with its own processors (softmax then one multinomial
        draw, or argmax, as ``generate`` draws). Rows with a generator of their own (seeded requests) draw one
        multinomial each from it; the others draw together from the process's generator."""
        def draw(processors, ids, logits, rows):
            scores = processors(ids, logits)
            if not processors.do_sample:
                return torch.argmax(scores, dim=-1)
            probs = torch.softmax(scores, dim=-1)
            if all(row.generator is None for row in rows):
                return torch.multinomial(probs, num_samples=1).squeeze(1)
            return torch.cat([torch.multinomial(p[None], num_samples=1, generator=row.generator)[0]
                              for p, row in zip(probs, rows)])

        keys = dict.fromkeys(self.kinds)
        if len(keys) == 1:
            return draw(self.processors[self.kinds[0]], self.ids, self.logits, self.rows)
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=self.ids.device)
        for key in keys:
            members = [b for b, k in enumerate(self.kinds) if k == key]
            index = torch.tensor(members, device=self.ids.device)
            tokens[index] = draw(self.processors[key], self.ids[index], self.logits[index],
                                 [self.rows[b] for b in members])
        return tokens

    def _admit(self) -> list[tuple[int, Rollout | list[int]]]:
        """Prefills queued requests into the running batch (up to ``batch_size`` rows); returns the ones that are
        done without decoding (a reply of 0 tokens) or that ``generate`` decoded."""
        if not self.queue or (self.rows and not self.mergeable):
            return []
        room = len(self.queue) if self.sampler.batch_size is None else self.sampler.batch_size - len(self.rows)
        taken, self.queue = self.queue[:max(room, 0)], self.queue[max(room, 0):]
        joining, kinds, done, fallback = [], [], [], []
        for handle, request in taken:
            key, processors = self._processors(request) if request.context else (None, None)
            if request.is_reply and request.reply_tokens <= 0:
                done.append((handle, []))
            elif processors is None:
                if request.context:
                    fallback.append((handle, request))
                else:
                    self.sampler.generate_calls += 1
                    _warn_once("compact decoding is off for an empty context; sampling with transformers' generate "
                               "instead.")
                    fallback.append((handle, request))
            else:
                joining.append((handle, request))
                kinds.append(key)
        if any(r.seed is not None for _, r in fallback):
            raise ValueError(
                "a request with a seed of its own needs transformers' generate here (an empty context, or logits "
                "processors that keep per-row state), which draws every row from one generator, so its seed would "
                "be ignored. Give every request a context and leave per-row processors (repetition penalty, "
                "minimum lengths) unset, or turn per_row_sampling_seed off.")
        if fallback:
            done += list(zip([h for h, _ in fallback], self.sampler._serve_generate([r for _, r in fallback])))
        if joining:
            self._prefill(joining, kinds)
        return done

    def _encode_prefix(self, contexts: list[list[int]], prefix: int, cache: DynamicCache):
        """Fills ``cache`` with the shared first ``prefix`` tokens of ``contexts``, encoded once and copied to every
        row; returns the rows' (ids, mask): the prefix, then each remainder left-padded (padding masked)."""
        device = self.model.device
        head = torch.tensor([contexts[0][:prefix]], dtype=torch.long, device=device)
        self.model(input_ids=head, use_cache=True, **{self.cache_name: cache}, **self.extra)
        cache.batch_select_indices(torch.zeros(len(contexts), dtype=torch.long, device=device))
        tail_ids, tail_mask = _left_pad([c[prefix:] for c in contexts], self.sampler.pad_id, device)
        ids = torch.cat([head.expand(len(contexts), -1), tail_ids], dim=1)
        mask = torch.cat([torch.ones_like(ids[:, :prefix]), tail_mask], dim=1)
        return ids, mask

    def _prefill(self, joining: list[tuple[int, DecodeRequest]], kinds: list[tuple]) -> None:
        sampler, device = self.sampler, self.model.device
        contexts = [request.context for _, request in joining]
        leaders, rows = _distinct(contexts) if sampler.share_prefill else (list(range(len(contexts))), None)
        distinct = [contexts[i] for i in leaders]
        prefix = _common_prefix_length(distinct) if sampler.share_prompt_prefix and len(distinct) > 1 else 0
        cache = DynamicCache(config=self.model.config)
        if prefix:
            ids, mask = self._encode_prefix(distinct, prefix, cache)
        else:
            ids, mask = _left_pad(distinct, sampler.pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions[:, prefix:],
                         use_cache=True, **{self.cache_name: cache}, **self.extra)
        logits = out.logits[:, -1].to(dtype=torch.float32)
        del out
        if len(leaders) < len(contexts):
            select = torch.tensor(rows, device=device)
            cache.batch_select_indices(select)
            ids, mask, positions, logits = ids[select], mask[select], positions[select], logits[select]
        states = [_RowState(handle, request, sampler) for handle, request in joining]
        next_position = positions[:, -1] + 1
        if self.cache is None:
            self.cache, self.ids, self.mask, self.next_position, self.logits = cache, ids, mask, next_position, logits
        else:
            width = max(self.ids.shape[1], ids.shape[1])
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_pad_time(old.keys, width), _pad_time(new.keys, width)])
                old.values = torch.cat([_pad_time(old.values, width), _pad_time(new.values, width)])
            self.ids = torch.cat([_pad_left(self.ids, width, sampler.pad_id), _pad_left(ids, width, sampler.pad_id)])
            self.mask = torch.cat([_pad_left(self.mask, width, 0), _pad_left(mask, width, 0)])
            self.next_position = torch.cat([self.next_position, next_position])
            self.logits = torch.cat([self.logits, logits])
        self.rows += states
        self.kinds += kinds


def _common_prefix_length(contexts: list[list[int]]) -> int:
    """How many leading tokens every context shares, leaving each at least one token of its own (the token whose
    logits start its decoding)."""
    shortest = min(len(c) for c in contexts) - 1
    length = 0
    while length < shortest and all(c[length] == contexts[0][length] for c in contexts):
        length += 1
    return length


def _pad_left(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    """A (batch, time) tensor left-padded with ``value`` to ``width`` columns."""
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)


def _pad_time(states: torch.Tensor, width: int) -> torch.Tensor:
    """Cached keys or values (batch, heads, time, dim) left-padded with zeros to ``width`` positions (masked)."""
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))
