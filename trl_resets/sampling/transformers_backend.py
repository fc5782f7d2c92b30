"""Thought-level sampling with transformers' ``generate``: one decoding pass per rollout.

The KV cache runs across thoughts and every cap is enforced while decoding by a stopping
criterion that follows each row with a `ThoughtTracker`, so a rollout is sampled exactly as
thought-by-thought prompting would sample it, at the cost of plain generation. Rows stop
independently; nothing is re-encoded between thoughts.

Rows that share a context (a group's rollouts of one prompt, the suffixes of one reset prefix) share
its prefill: each distinct context is encoded once and its KV cache is copied to its rows before
decoding, as vLLM's prefix caching does. Decoding is unchanged; only the duplicate prefill goes. (A
model sampled in training mode with dropout draws one dropout mask for a shared prefill instead of one
per row; the trainer samples in eval mode, see `sampling_weights`.)

Compact decoding (the default): rather than ``generate``, which computes every row of a batch until the
last one stops, the sampler runs its own decoding loop that drops a row, and its slice of the KV cache,
as soon as it stops. The work then follows the tokens actually drawn, not rows x the longest row, which
matters most where a decoding step costs in proportion to its rows (a CPU) and where rollout lengths
vary (a group's failures stop early; suffixes are shorter than rollouts). The logits processors are the
ones ``generate`` builds for the same config, and the tokens are drawn the same way (softmax then one
``multinomial`` per step, or argmax), so until a row stops the draws equal ``generate``'s. Configs whose
processors keep per-row state (repetition penalty, minimum lengths, ...) and prompt-learning adapters use
``generate``, with a warning.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation import logits_process as _lp

from ..thoughts import Rollout, ThoughtFormat, ThoughtTracker


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
        compact: decode with the sampler's own loop, which drops each row from the batch (and the KV cache)
            as soon as it stops; ``False`` uses ``generate``. Off for collective decoding.
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
        self.compact = compact and not collective
        self.generated_tokens = 0
        self.prefill_tokens = 0  # context tokens encoded (after sharing), for benchmarks
        self.row_steps = 0  # rows fed to the model over all decoding steps (after compaction), for benchmarks
        self.generate_calls = 0  # calls that went to `generate` although compact decoding was asked for

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

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
        """Each context's new tokens. ``stop(row, token)`` says whether row ``row`` ends with ``token``;
        no row goes past ``settings["max_new_tokens"]``."""
        config = self._config(settings)
        processors = self._compact_processors(config, contexts) if self.compact else None
        if processors is not None:
            return self._decode_compact(contexts, config, processors, stop)
        criterion = _StopRows(stop, len(contexts))
        out = self._generate(contexts, config, stopping_criteria=StoppingCriteriaList([criterion]))
        self.row_steps += out.shape[0] * out.shape[1]
        return [tokens[:length] for tokens, length in zip(out.tolist(), criterion.lengths)]

    def _compact_processors(self, config: GenerationConfig, contexts):
        """The logits processors ``generate`` would build for ``config``, or None (use ``generate``) when one of
        them keeps per-row state, the model is under a prompt-learning adapter, or a context is empty."""
        peft_config = getattr(self.model, "active_peft_config", None)
        reason = None
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            reason = "a prompt-learning adapter"
        elif not all(contexts):
            reason = "an empty context"
        else:
            try:  # generate's own config resolution and processor list (private helpers of transformers 5)
                resolved, _ = self.model._prepare_generation_config(copy.deepcopy(config))
                processors = self.model._get_logits_processor(
                    generation_config=resolved, input_ids_seq_length=max(len(c) for c in contexts),
                    device=self.model.device,
                )
            except (AttributeError, TypeError, ValueError) as error:
                resolved, processors = None, None
                reason = f"this transformers version ({type(error).__name__}: {error})"
            if processors is not None:
                unsafe = [type(p).__name__ for p in processors if not isinstance(p, _ROW_SAFE_PROCESSORS)]
                if not unsafe and not (resolved.min_new_tokens or resolved.min_length):
                    processors.do_sample = bool(resolved.do_sample)
                    return processors
                reason = f"logits processors that keep per-row state ({', '.join(unsafe) or 'minimum lengths'})"
        self.generate_calls += 1
        _warn_once(f"compact decoding is off for {reason}; sampling with transformers' generate instead.")
        return None

    def _forward_kwargs(self) -> dict:
        """``logits_to_keep=1`` where the model takes it: the prefill needs only the last position's logits."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    def _no_router_logits(self) -> dict:
        """Sampling computes no loss: a mixture-of-experts model that returns router logits by default would
        compute its load-balancing loss at every decoding step, against an attention mask longer than the step."""
        return {"output_router_logits": False} if getattr(self.model.config, "output_router_logits", False) else {}

    @torch.no_grad()
    def _decode_compact(self, contexts, config: GenerationConfig, processors, stop) -> list[list[int]]:
        """The decoding loop: one forward pass per step over the rows still running; a row that stops leaves
        the batch and the cache at once. Positions follow the left padding as ``generate`` numbers them."""
        device = self.model.device
        ids, mask = _left_pad(contexts, self.pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        leaders, rows = _distinct(contexts) if self.share_prefill else (list(range(len(contexts))), None)
        cache = DynamicCache(config=self.model.config)
        extra = {**self._forward_kwargs(), **self._no_router_logits()}
        cache_name = cache_kwarg(self.model)
        shared = len(leaders) < len(contexts)
        index = torch.tensor(leaders, device=device) if shared else slice(None)
        out = self.model(input_ids=ids[index], attention_mask=mask[index], position_ids=positions[index],
                         use_cache=True, **{cache_name: cache}, **extra)
        logits = out.logits[:, -1].to(dtype=torch.float32)
        del out
        self.prefill_tokens += sum(len(contexts[i]) for i in leaders)
        if shared:
            select = torch.tensor(rows, device=device)
            cache.batch_select_indices(select)
            logits = logits[select]
        alive = list(range(len(contexts)))  # batch row -> context index
        replies: list[list[int]] = [[] for _ in contexts]
        next_position = positions[:, -1] + 1
        for step in range(config.max_new_tokens):
            self.row_steps += len(alive)
            scores = processors(ids, logits)
            if processors.do_sample:
                tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            keep = []
            for b, token in enumerate(tokens.tolist()):
                replies[alive[b]].append(token)
                if not stop(alive[b], token):
                    keep.append(b)
            if not keep or step + 1 == config.max_new_tokens:
                break
            ids = torch.cat([ids, tokens[:, None]], dim=-1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            if len(keep) < len(alive):
                select = torch.tensor(keep, device=device)
                cache.batch_select_indices(select)
                ids, mask, tokens, next_position = ids[select], mask[select], tokens[select], next_position[select]
                alive = [alive[b] for b in keep]
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                             use_cache=True, **{cache_name: cache}, **self._no_router_logits())
            logits = out.logits[:, -1].to(dtype=torch.float32)
            next_position = next_position + 1
        return replies

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
        leaders, rows = _distinct(contexts)
        if len(leaders) == len(contexts) or ids.shape[1] < 2:
            return None
        head_ids, head_mask = ids[leaders, :-1], mask[leaders, :-1]
        positions = (head_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=head_ids, attention_mask=head_mask, position_ids=positions, use_cache=True,
                   **{cache_kwarg(self.model): cache}, **self._no_router_logits())
        cache.batch_select_indices(torch.tensor(rows, device=ids.device))
        self.prefill_tokens += sum(len(contexts[i]) for i in leaders) + len(contexts)
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
        rollouts: list[Rollout] = []
        for chunk in self._chunks(n):
            trackers = [
                ThoughtTracker(self.fmt, self._decode, self.eos_ids, start_thoughts[i], max(token_budgets[i], 1))
                for i in chunk
            ]
            self._run(
                [contexts[i] for i in chunk],
                {"max_new_tokens": max(t.token_budget for t in trackers)},
                lambda row, token: trackers[row].push(token),
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
            replies += self._run([prompts[i] for i in chunk], settings, lambda row, token: token in self.eos_ids)
        self.generated_tokens += sum(len(r) for r in replies)
        return replies
