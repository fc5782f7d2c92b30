"""A CPU stand-in for vLLM that follows the parts of its documented API TRL's wrapper uses.

vLLM cannot run on our machines (CUDA-only wheels), so the vLLM paths are tested against this
fake: ``LLM.generate(prompts=[{"prompt_token_ids": ...}], sampling_params=...)`` returning
request outputs with ``.outputs[0].token_ids`` / ``.logprobs`` (dicts of token id -> Logprob with
``.logprob`` and ``.rank``); ``SamplingParams`` fields ``n``, ``temperature``, ``max_tokens``,
``stop`` (strings; the tokens that complete a stop string are kept, as in vLLM), ``logprobs``;
the colocated weight-loading path (``llm_engine.model_executor.driver_worker.model_runner.model
.load_weights``), ``reset_prefix_cache``, and the server client's ``generate`` /
``get_server_info`` / ``update_named_params``. Tokens are sampled from a real torch model, and a
prefix cache is simulated so tests can count how many prompt tokens were encoded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from trl.generation import vllm_generation
from trl.generation.vllm_generation import VLLMGeneration


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    logprobs: int | None = None
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    def __init__(self, **kwargs):
        names = {f for f in self.__dataclass_fields__ if f != "extra"}
        for name in names:
            setattr(self, name, kwargs.pop(name, self.__dataclass_fields__[name].default))
        self.extra = kwargs


@dataclass
class FakeLogprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


class _Weights:
    def __init__(self, model):
        self.model = model
        self.loads = 0

    def load_weights(self, weights):
        state = self.model.state_dict()
        for name, tensor in weights:
            if name not in state:
                raise KeyError(f"fake vLLM model has no parameter {name!r}")
            state[name].copy_(tensor.detach().to(state[name].dtype))
            self.loads += 1


class FakeLLM:
    """``vllm.LLM`` look-alike over a copy of a transformers causal LM."""

    def __init__(self, model, tokenizer, prefix_caching: bool = True, seed: int = 0):
        model = copy.deepcopy(model)
        if hasattr(model, "merge_and_unload"):  # a PEFT model: the engine holds the plain base model, as vLLM
            model = model.merge_and_unload()  # loads it from its files (TRL then sends merged weights by name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = _Weights(self.model)
        self.llm_engine = SimpleNamespace(
            vllm_config=SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching)),
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.weights))),
            model_config=SimpleNamespace(max_model_len=4096),
        )
        self.prefix_caching = prefix_caching
        self._cache: list[tuple[int, ...]] = []
        self.prefill_tokens = 0  # prompt tokens encoded (not served from the prefix cache)
        self.decoded_tokens = 0
        self.requests = 0
        self.calls = []  # sampling params of each call

    def reset_prefix_cache(self):
        self._cache.clear()

    def _cached_length(self, ids: tuple[int, ...]) -> int:
        if not self.prefix_caching:
            return 0
        best = 0
        for seen in self._cache:
            n = 0
            for a, b in zip(seen, ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best

    @torch.no_grad()
    def _one(self, prompt: list[int], params: FakeSamplingParams):
        self.prefill_tokens += len(prompt) - self._cached_length(tuple(prompt))
        ids = list(prompt)
        out, lps = [], []
        eos = self.tokenizer.eos_token_id
        for _ in range(params.max_tokens):
            x = torch.tensor([ids])
            logits = self.model(input_ids=x, position_ids=torch.arange(len(ids))[None], logits_to_keep=1).logits[0, -1].float()
            if params.temperature and params.temperature > 0:
                logp = torch.log_softmax(logits / params.temperature, -1)
                token = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
            else:
                logp = torch.log_softmax(logits, -1)
                token = int(logits.argmax())
            rank = int((logp > logp[token]).sum()) + 1
            ids.append(token)
            out.append(token)
            lps.append({token: FakeLogprob(float(logp[token]), rank)})
            if token == eos:
                break
            if params.stop:
                text = self.tokenizer.decode(out, skip_special_tokens=False)
                if any(s in text for s in params.stop):
                    break
        self.decoded_tokens += len(out)
        if self.prefix_caching:
            self._cache.append(tuple(ids))
        return out, lps

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        params = sampling_params or FakeSamplingParams()
        self.calls.append(params)
        results = []
        for prompt in prompts:
            ids = list(prompt["prompt_token_ids"])
            outputs = []
            for _ in range(params.n):
                self.requests += 1
                tokens, lps = self._one(ids, params)
                outputs.append(SimpleNamespace(token_ids=tokens, logprobs=lps if params.logprobs is not None else None))
            results.append(SimpleNamespace(prompt_token_ids=ids, outputs=outputs))
        return results


class FakeVLLMClient:
    """``trl.generation.vllm_client.VLLMClient`` look-alike (the server side is a FakeLLM)."""

    def __init__(self, llm: FakeLLM):
        self.llm = llm
        self.weight_updates = 0

    def get_server_info(self):
        return {
            "cache_config": {"enable_prefix_caching": self.llm.prefix_caching},
            "model_config": {"logprobs_mode": "processed_logprobs"},
        }

    def init_communicator(self, device=None):
        pass

    def generate(self, prompts, features=None, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0,
                 min_p=0.0, max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None):
        params = FakeSamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=logprobs,
                                    **(generation_kwargs or {}))
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        completions = [o.token_ids for r in outs for o in r.outputs]
        lps = [[[next(iter(d.values())).logprob] for d in o.logprobs] for r in outs for o in r.outputs]
        return {"prompt_ids": [r.prompt_token_ids for r in outs], "completion_ids": completions, "logprobs": lps,
                "logprob_token_ids": [[[next(iter(d))] for d in o.logprobs] for r in outs for o in r.outputs]}

    def update_named_params(self, metadata, params):
        self.llm.weights.load_weights(params)
        self.weight_updates += 1

    def reset_prefix_cache(self):
        self.llm.reset_prefix_cache()

    def close_communicator(self):
        pass


def fake_vllm_generation_class(prefix_caching: bool = True, registry: list | None = None):
    """A subclass of TRL's real ``VLLMGeneration`` whose engine start-up installs the fakes."""

    class FakeEngineVLLMGeneration(VLLMGeneration):
        def _init_vllm(self):
            llm = FakeLLM(self.model, self.processing_class, prefix_caching=prefix_caching,
                          seed=self.accelerator.process_index)
            if self.mode == "colocate":
                self.llm = llm
            elif self.accelerator.is_main_process:  # as in TRL: only the main process talks to the server
                self.vllm_client = FakeVLLMClient(llm)
            self.fake_llm = llm
            if registry is not None:
                registry.append(self)

    return FakeEngineVLLMGeneration


def install(monkeypatch=None, prefix_caching: bool = True) -> list:
    """Makes ``use_vllm=True`` trainers start fake engines; returns the list the engines are added to.

    With a pytest ``monkeypatch`` the change is undone after the test; without one (a worker process)
    it lasts for the process.
    """
    import trl.trainer.grpo_trainer as grpo_module

    registry: list = []
    engine_class = fake_vllm_generation_class(prefix_caching, registry)
    if monkeypatch is None:
        vllm_generation.SamplingParams = FakeSamplingParams
        grpo_module.VLLMGeneration = engine_class
    else:
        monkeypatch.setattr(vllm_generation, "SamplingParams", FakeSamplingParams, raising=False)
        monkeypatch.setattr(grpo_module, "VLLMGeneration", engine_class)
    return registry
