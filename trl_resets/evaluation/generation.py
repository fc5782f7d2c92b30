"""Batched completions for the evaluator: the package's thought sampler on its rollout prompt.

Each question is wrapped in the rollout template (the thought-by-thought instruction the trainer
uses), put through the tokenizer's chat template, and sampled with the package's thought sampler, so
a completion stops where a training rollout would (a final answer, the thought caps, EOS). Two
backends: transformers (any machine) and vLLM (when it is installed and a GPU is there).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from ..thoughts import CODE_ROLLOUT_TEMPLATE, DEFAULT_DELIMITER, DEFAULT_ROLLOUT_TEMPLATE, ThoughtFormat, wrap_question

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "transformers", "vllm")


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled.

    Attributes:
        temperature: 0 decodes greedily (the paper's evaluation); above 0 samples.
        top_p: nucleus sampling when ``temperature > 0``.
        num_samples: completions per item (more than one needs ``temperature > 0``).
        template, delimiter: the rollout prompt and the thought delimiter (``template=None``: prompts as they are).
        answer_format: what ends a completion as answered (``"boxed"`` or ``"code"``, see `ThoughtFormat`); with
            ``"code"`` the package's math template becomes its code template.
        max_thoughts, max_thought_tokens, max_completion_tokens: the thought caps.
        batch_size: items decoded together.
        seed: seeds the sampling (``temperature > 0``).
        share_prompt_prefix: with transformers, encode the opening that every prompt of a batch shares (the chat
            template and the rollout instruction) once, and only each prompt's own tail per row (the sampler's
            ``share_prompt_prefix``). Off by default: each row's logits equal the unshared ones only up to float
            rounding, as batching's padding does too.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    template: str | None = DEFAULT_ROLLOUT_TEMPLATE
    delimiter: str = DEFAULT_DELIMITER
    answer_format: str = "boxed"
    max_thoughts: int = 20
    max_thought_tokens: int = 256
    max_completion_tokens: int = 2048
    batch_size: int = 32
    seed: int = 0
    share_prompt_prefix: bool = False

    def __post_init__(self):
        if self.answer_format == "code" and self.template == DEFAULT_ROLLOUT_TEMPLATE:
            object.__setattr__(self, "template", CODE_ROLLOUT_TEMPLATE)
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: use 0 (greedy) or a positive temperature.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: draw at least one completion per item.")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError(f"num_samples={self.num_samples} at temperature 0 gives {self.num_samples} identical "
                             "greedy completions; set a temperature above 0 (e.g. 0.7) or num_samples=1.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: decode at least one item at a time.")
        if self.template is not None:
            wrap_question("", self.template, self.delimiter)  # an unknown placeholder fails here, not mid-run
        self.thought_format()

    def thought_format(self) -> ThoughtFormat:
        return ThoughtFormat(delimiter=self.delimiter, max_thoughts=self.max_thoughts,
                             max_thought_tokens=self.max_thought_tokens,
                             max_completion_tokens=self.max_completion_tokens, answer=self.answer_format)

    def for_answer_format(self, answer_format: str) -> GenerationSettings:
        """These settings for a benchmark whose answers have ``answer_format`` (the template follows it when it is
        the package's own)."""
        if answer_format == self.answer_format:
            return self
        template = DEFAULT_ROLLOUT_TEMPLATE if self.template == CODE_ROLLOUT_TEMPLATE else self.template
        return replace(self, answer_format=answer_format, template=template)


def prompt_ids(tokenizer, question, settings: GenerationSettings) -> list[int]:
    """The token ids of one rollout prompt: the question (a text, or a conversation whose last message it is)
    wrapped in the template, through the chat template when the tokenizer has one."""
    messages = list(question) if isinstance(question, (list, tuple)) else [{"role": "user", "content": question}]
    if settings.template is not None:
        last = messages[-1]
        messages[-1] = {**last, "content": wrap_question(last["content"], settings.template, settings.delimiter)}
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(ids["input_ids"])
    return list(tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])


def eos_ids(generation_config, tokenizer) -> list[int]:
    """Every token that ends a completion: the generation config's EOS ids and the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    found = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in found:
        found.append(tokenizer.eos_token_id)
    return found


class Completer:
    """Completions of questions from a `ThoughtSampler` (``sampler.sample(contexts) -> rollouts``)."""

    def __init__(self, sampler, tokenizer, settings: GenerationSettings):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.settings = settings

    def complete(self, questions: list[str], answer_format: str | None = None) -> list[list[str]]:
        """``settings.num_samples`` completion texts per question (``answer_format``: the benchmark's, when it differs
        from the settings')."""
        settings = self.settings if answer_format is None else self.settings.for_answer_format(answer_format)
        n = settings.num_samples
        contexts = [prompt_ids(self.tokenizer, q, settings) for q in questions for _ in range(n)]
        kept, self.sampler.fmt = self.sampler.fmt, settings.thought_format()
        try:
            rollouts = self.sampler.sample(contexts)
        finally:
            self.sampler.fmt = kept
        texts = [self.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]
        return [texts[i * n:(i + 1) * n] for i in range(len(questions))]


def transformers_completer(model, tokenizer, settings: GenerationSettings) -> Completer:
    """A completer over a loaded transformers model (a PEFT model too)."""
    from transformers import GenerationConfig

    from ..sampling import TransformersThoughtSampler

    if settings.temperature > 0:
        config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        config = GenerationConfig(do_sample=False, temperature=None, top_p=None, top_k=None)
    sampler = TransformersThoughtSampler(model, tokenizer, settings.thought_format(), generation_config=config,
                                         eos_ids=eos_ids(model.generation_config, tokenizer),
                                         batch_size=settings.batch_size * settings.num_samples,
                                         share_prompt_prefix=settings.share_prompt_prefix)
    return Completer(sampler, tokenizer, settings)


def vllm_completer(llm, tokenizer, settings: GenerationSettings, eos: list[int]) -> Completer:
    """A completer over a ``vllm.LLM``: the package's vLLM thought sampler driving it directly (one request per
    completion; per-thought rounds when the engine caches prefixes)."""
    from ..sampling import VLLMThoughtSampler, prefix_caching_enabled

    engine = SimpleNamespace(
        mode="colocate", llm=llm, temperature=settings.temperature, top_p=settings.top_p, top_k=0, min_p=0.0,
        repetition_penalty=1.0, logprobs=None,
        generation_kwargs={"seed": settings.seed} if settings.temperature > 0 else {},
    )
    per_thought = prefix_caching_enabled(engine) is True
    sampler = VLLMThoughtSampler(engine, tokenizer, settings.thought_format(), eos_ids=eos, per_thought=per_thought)
    return Completer(sampler, tokenizer, settings)


def choose_backend(backend: str) -> str:
    """``"auto"``: vLLM when it is installed and a CUDA GPU is there, transformers otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {BACKENDS}.")
    import importlib.util

    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm" and not (has_vllm and torch.cuda.is_available()):
        raise ValueError("backend='vllm' needs vLLM installed (`pip install trl-resets[vllm]`) and a CUDA GPU; "
                         "use backend='transformers' here.")
    if backend == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    return backend


def load_transformers_model(model: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) from a folder or hub id, with a LoRA adapter merged in when one is given; on the GPU
    when there is one (``device``: elsewhere)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    has_own_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_own_tokenizer else model)  # a trainer saves it there
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter).merge_and_unload()
    return loaded.to(device).eval(), tokenizer


def make_completer(model: str, adapter: str | None, settings: GenerationSettings, backend: str = "auto",
                   dtype: str = "auto", llm_factory=None, **llm_kwargs) -> Completer:
    """The completer for a model (and adapter) on the chosen backend.

    With vLLM an adapter is merged into a temporary copy of the model first, which the engine loads.
    ``llm_factory`` builds the engine from a model folder (``vllm.LLM`` by default; given, the vLLM path
    runs on whatever engine it returns).
    """
    backend = "vllm" if llm_factory is not None else choose_backend(backend)
    if backend == "transformers":
        loaded, tokenizer = load_transformers_model(model, adapter, dtype)
        return transformers_completer(loaded, tokenizer, settings)
    if llm_factory is None:
        from vllm import LLM as llm_factory
    if adapter is None:
        from transformers import AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(model)
        try:
            generation_config = GenerationConfig.from_pretrained(model)
        except OSError:  # a model without generation_config.json: the tokenizer's EOS only
            generation_config = None
        llm = llm_factory(model=model, seed=settings.seed, **llm_kwargs)
        return vllm_completer(llm, tokenizer, settings, eos_ids(generation_config, tokenizer))
    merged, tokenizer = load_transformers_model(model, adapter, "bfloat16" if dtype == "auto" else dtype, "cpu")
    generation_config = merged.generation_config
    with tempfile.TemporaryDirectory(prefix="trl-resets-merged-") as folder:  # the engine reads it once, at start
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del merged
        logger.info("merged the adapter %s into a temporary copy of %s for vLLM", adapter, model)
        llm = llm_factory(model=folder, seed=settings.seed, **llm_kwargs)
    return vllm_completer(llm, tokenizer, settings, eos_ids(generation_config, tokenizer))
