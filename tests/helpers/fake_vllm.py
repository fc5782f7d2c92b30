"""A CPU stand-in for vLLM that follows the parts of its behaviour TRL's wrapper and trl-resets rely on.

vLLM cannot run on our machines (CUDA-only wheels), so the vLLM paths are tested against this
stand-in. Tokens are sampled from a real torch model. What it follows (vLLM v1, as read from its source):

* ``LLM.generate(prompts=[{"prompt_token_ids": ...}], sampling_params=...)`` with one
  ``SamplingParams`` or one per prompt, returning request outputs with ``.outputs[i].token_ids``,
  ``.logprobs`` (per position a dict token id -> ``Logprob(logprob, rank)``: the top ``logprobs``
  tokens plus the sampled one), ``.finish_reason`` (``"stop"`` / ``"length"``) and ``.stop_reason``
  (None for EOS, the stop string, or the stop token id).
* Per-request random generators: a request with ``seed`` draws from its own generator seeded with it
  (``n > 1`` children get ``seed + index``); unseeded requests share the engine's generator (the
  server client: one generator per call, see `FakeVLLMClient`).
* Per-request options: ``repetition_penalty`` (prompt and output tokens), ``presence_penalty`` and
  ``frequency_penalty`` (output tokens only), ``min_tokens`` (EOS, stop tokens and stop strings held
  back until then), ``ignore_eos``, ``stop_token_ids``.
* Logprobs as ``logprobs_mode="processed_logprobs"`` (TRL's setting) in recent vLLM sources: after
  penalties, temperature, min-p, top-k and top-p; masked tokens have -inf. (Some earlier v1
  releases computed them after the penalties only; which releases of TRL 1.16's range, vLLM
  0.22-0.31, do which has not been checked.) Greedy (temperature 0) takes the argmax of the
  penalised logits and reports their log-softmax.
* EOS: the tokenizer's EOS and every EOS id of the model's generation config end a request (kept in
  ``token_ids``). Stop strings are matched on the completion decoded with ``skip_special_tokens``
  (vLLM's default True); the tokens that complete one are kept.
* ``max_model_len``: ``LLM.generate`` raises on a prompt longer than it and silently caps the new
  tokens of the others (``finish_reason="length"``); the server rejects the whole request (the
  client raises ``Request failed: 400``) when any prompt plus ``max_tokens`` exceeds it.
* Prefix caching by whole blocks (``block_size`` 16): a request reuses the longest run of cached
  full blocks of its prompt, at most ``len(prompt) - 1`` tokens; the prompt and the completion
  without its last token (whose KV is never computed) are cached as full blocks.
* The server client: ``VLLMClient.generate`` merges ``generation_kwargs`` over its explicit
  arguments, applies one parameter set to every prompt of a call, returns per position the ranked
  logprobs and their token ids (sampled token included), and ``logprobs=None`` when not asked;
  ``get_server_info`` returns the config tree; ``update_named_params``, ``reset_prefix_cache``.
* The colocated weight-loading path (``llm_engine.model_executor.driver_worker.model_runner.model
  .load_weights``).

What it does not model, and where real vLLM can differ: numerics (vLLM's kernels, batch-dependent
floating point, bf16 KV cache), scheduling (requests run one after another, so the cache sees an
earlier request of the same call at once; vLLM may run them in the same step), sampling parameters
it does not list above (it raises ``NotImplementedError`` on them), structured outputs, thinking
budgets and bad words, speculative decoding, the incremental detokenizer (it decodes the whole
completion at every step, which can differ for byte-fallback tokenizers), and real HTTP transport.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from types import SimpleNamespace

import torch
from trl.generation import vllm_generation
from trl.generation.vllm_generation import VLLMGeneration

_GREEDY_EPS = 1e-5  # vLLM treats temperatures below this as greedy

_FIELDS = {
    "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 1.0,
    "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": None, "stop_token_ids": None,
    "ignore_eos": False, "max_tokens": 16, "min_tokens": 0, "logprobs": None, "detokenize": True,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "include_stop_str_in_output": False,
}


class FakeSamplingParams:
    """``vllm.SamplingParams`` with the fields listed in the module docstring (others raise)."""

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(_FIELDS))
        if unknown:
            raise NotImplementedError(f"the vLLM stand-in does not model SamplingParams {unknown}")
        for name, default in _FIELDS.items():
            setattr(self, name, kwargs.get(name, default))
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def __repr__(self):
        return f"FakeSamplingParams({vars(self)})"


class FakeLogprob:
    def __init__(self, logprob: float, rank: int):
        self.logprob, self.rank = logprob, rank


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


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def processed_logprobs(logits: torch.Tensor, params: FakeSamplingParams) -> torch.Tensor:
    """Log-probabilities after temperature, min-p, top-k and top-p (masked tokens at -inf), as vLLM samples."""
    if params.temperature < _GREEDY_EPS:
        return torch.log_softmax(logits, -1)
    logits = logits / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k and 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        order = torch.argsort(logits)  # ascending: drop the low tail whose mass stays within 1 - top_p
        tail = torch.softmax(logits[order], -1).cumsum(-1) <= 1 - params.top_p
        tail[-1] = False  # the most likely token always stays
        logits = logits.clone()
        logits[order[tail]] = float("-inf")
    return torch.log_softmax(logits, -1)


class FakeLLM:
    """``vllm.LLM`` look-alike over a copy of a transformers causal LM."""

    def __init__(self, model, tokenizer, prefix_caching: bool = True, seed: int = 0, max_model_len: int = 4096,
                 block_size: int = 16):
        model = copy.deepcopy(model)
        # vLLM loads the model from its files, so none of the trainer's per-instance patches reach it. They must
        # not reach the copy either: TRL's fused-LM-head patch (`add_fused_lm_head`) binds the model's original
        # `forward` in a closure, which a deep copy keeps pointing at the trainer's live model (train mode, LoRA
        # dropout), so the engine would sample from that model instead of the weights loaded into it.
        for module in model.modules():
            module.__dict__.pop("forward", None)
        if hasattr(model, "merge_and_unload"):  # a PEFT model: the engine holds the plain base model, as vLLM
            model = model.merge_and_unload()  # loads it from its files (TRL then sends merged weights by name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = _Weights(self.model)
        self.max_model_len = max_model_len
        self.block_size = block_size
        model_config = SimpleNamespace(max_model_len=max_model_len)
        self.llm_engine = SimpleNamespace(
            vllm_config=SimpleNamespace(
                cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching, block_size=block_size),
                model_config=model_config,
            ),
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.weights))
            ),
            model_config=model_config,
        )
        self.prefix_caching = prefix_caching
        self._blocks: set[tuple[int, ...]] = set()
        self.prefill_tokens = 0  # prompt tokens encoded (not served from the prefix cache)
        self.decoded_tokens = 0
        self.requests = 0
        self.calls = []  # the sampling params of each request

    def reset_prefix_cache(self):
        self._blocks.clear()

    def _cached_length(self, prompt: list[int]) -> int:
        if not self.prefix_caching:
            return 0
        cached, size = 0, self.block_size
        while cached + size <= len(prompt) - 1 and tuple(prompt[: cached + size]) in self._blocks:
            cached += size
        return cached

    def _cache(self, ids: list[int]) -> None:
        if self.prefix_caching:
            for end in range(self.block_size, len(ids) + 1, self.block_size):
                self._blocks.add(tuple(ids[:end]))

    def _next_logits(self, ids: list[int], out: list[int], params: FakeSamplingParams, eos: set[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        logits = self.model(input_ids=x, position_ids=torch.arange(len(ids))[None], logits_to_keep=1).logits[0, -1]
        logits = logits.float().clone()
        if len(out) < params.min_tokens:
            for token in eos | set(params.stop_token_ids or []):
                logits[token] = float("-inf")
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            values = logits[seen]
            penalty = params.repetition_penalty
            logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
        if out and (params.presence_penalty or params.frequency_penalty):
            counts = torch.bincount(torch.tensor(out), minlength=logits.numel()).float()
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
        return logits

    def _stop(self, out: list[int], params: FakeSamplingParams, eos: set[int]):
        """(finish_reason, stop_reason) once the request is done, else None."""
        if len(out) < params.min_tokens:
            return None
        last = out[-1]
        if not params.ignore_eos and last in eos:
            return "stop", None
        if last in (params.stop_token_ids or []):
            return "stop", last
        if params.stop and params.detokenize:  # as vLLM's detokenizer: only where the new text can complete a stop
            text = self.tokenizer.decode(out, skip_special_tokens=params.skip_special_tokens)
            new = len(text) - len(self.tokenizer.decode(out[:-1], skip_special_tokens=params.skip_special_tokens))
            for s in params.stop:
                if s in text[max(0, len(text) - new - len(s) + 1):]:
                    return "stop", s
        return None

    @torch.no_grad()
    def _one(self, prompt: list[int], params: FakeSamplingParams, generator: torch.Generator):
        self.prefill_tokens += len(prompt) - self._cached_length(prompt)
        self._cache(prompt)
        eos = set() if params.ignore_eos else _eos_ids(self.model, self.tokenizer)
        limit = max(self.max_model_len - len(prompt), 1)
        budget = limit if params.max_tokens is None else min(params.max_tokens, limit)
        ids, out, lps = list(prompt), [], []
        finish = ("length", None)
        while len(out) < budget:
            logp = processed_logprobs(self._next_logits(ids, out, params, eos), params)
            if params.temperature < _GREEDY_EPS:
                token = int(logp.argmax())
            else:
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
            ids.append(token)
            out.append(token)
            entry = {token: FakeLogprob(float(logp[token]), int((logp > logp[token]).sum()) + 1)}
            if params.logprobs:
                top = torch.topk(logp, min(params.logprobs, logp.numel())).indices.tolist()
                entry.update({t: FakeLogprob(float(logp[t]), rank + 1) for rank, t in enumerate(top)})
            lps.append(entry)
            stopped = self._stop(out, params, eos)
            if stopped:
                finish = stopped
                break
        self.decoded_tokens += len(out)
        self._cache(ids[:-1])  # the last sampled token was never fed, so it has no KV
        return SimpleNamespace(token_ids=out, logprobs=lps if params.logprobs is not None else None,
                               finish_reason=finish[0], stop_reason=finish[1])

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        params = sampling_params if sampling_params is not None else FakeSamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        for prompt in prompts:
            if len(prompt["prompt_token_ids"]) > self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(prompt['prompt_token_ids'])}) is longer than the "
                                 f"maximum model length of {self.max_model_len}.")
        results = []
        for prompt, p in zip(prompts, per_prompt):
            ids = list(prompt["prompt_token_ids"])
            outputs = []
            for index in range(p.n):
                self.requests += 1
                self.calls.append(p)
                generator = self.generator if p.seed is None else torch.Generator().manual_seed(p.seed + index)
                outputs.append(self._one(ids, p, generator))
            results.append(SimpleNamespace(prompt_token_ids=ids, outputs=outputs))
        return results


class FakeVLLMClient:
    """``trl.generation.vllm_client.VLLMClient`` look-alike (the server side is a FakeLLM).

    Calls may arrive from several threads at once (as TRL's client sends them, and as trl-resets sends a wave's
    calls); they are served one at a time. An unseeded call draws from a generator of its own, keyed by the engine's
    seed, the call's prompts and sampling settings and how many identical calls came before, so its samples do not depend on
    the order in which calls in flight together are served (a real server's unseeded samples are not reproducible
    at all)."""

    def __init__(self, llm: FakeLLM):
        self.llm = llm
        self.weight_updates = 0
        self.bodies = []  # the sampling settings of each /v1/completions call, after the client's merge
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}

    def get_server_info(self):
        return {
            "cache_config": {"enable_prefix_caching": self.llm.prefix_caching, "block_size": self.llm.block_size},
            "model_config": {"logprobs_mode": "processed_logprobs", "max_model_len": self.llm.max_model_len},
        }

    def init_communicator(self, device=None):
        pass

    def generate(self, prompts, features=None, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0,
                 min_p=0.0, max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None):
        body = {"n": n, "repetition_penalty": repetition_penalty, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "min_p": min_p, "max_tokens": max_tokens, "logprobs": logprobs}
        if structured_outputs_regex is not None:
            body["structured_outputs"] = {"regex": structured_outputs_regex}
        body.update(generation_kwargs or {})
        with self._lock:
            return self._serve(prompts, body)

    def _serve(self, prompts, body):
        self.bodies.append(body)
        for prompt in prompts:  # the server validates the request before it runs any of it
            if len(prompt) + (body["max_tokens"] or 0) > self.llm.max_model_len:
                raise Exception(  # noqa: TRY002 (the type TRL's client raises on an HTTP error)
                    f"Request failed: 400, This model's maximum context length is {self.llm.max_model_len} tokens. "
                    f"However, you requested {body['max_tokens']} output tokens and your prompt contains "
                    f"{len(prompt)} input tokens."
                )
        key = repr((prompts, sorted((k, v) for k, v in body.items() if k != "logprobs")))  # what decides the draws
        self._seen[key] = self._seen.get(key, 0) + 1
        digest = hashlib.blake2b(f"{self.llm.seed}/{key}/{self._seen[key]}".encode(), digest_size=7).digest()
        shared, self.llm.generator = self.llm.generator, torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], FakeSamplingParams(**body))
        finally:
            self.llm.generator = shared
        samples = [o for r in outs for o in r.outputs]
        ranked = None
        if body["logprobs"] is not None:
            ranked = [[sorted(d.items(), key=lambda item: -item[1].logprob) for d in o.logprobs] for o in samples]
        return {
            "prompt_ids": [r.prompt_token_ids for r in outs],
            "completion_ids": [o.token_ids for o in samples],
            "logprobs": None if ranked is None else [[[lp.logprob for _, lp in pos] for pos in row] for row in ranked],
            "logprob_token_ids": None if ranked is None else [[[t for t, _ in pos] for pos in row] for row in ranked],
        }

    def update_named_params(self, metadata, params):
        self.llm.weights.load_weights(params)
        self.weight_updates += 1

    def reset_prefix_cache(self):
        self.llm.reset_prefix_cache()

    def close_communicator(self):
        pass


def fake_vllm_generation_class(prefix_caching: bool = True, registry: list | None = None,
                               server_max_model_len: int | None = None):
    """A subclass of TRL's real ``VLLMGeneration`` whose engine start-up installs the fakes.

    The engine's ``max_model_len`` is, as in vLLM, the one asked for (``vllm_max_model_length`` in colocate
    mode, ``server_max_model_len`` for the server) or else the model's ``max_position_embeddings``.
    """

    class FakeEngineVLLMGeneration(VLLMGeneration):
        def _init_vllm(self):
            asked = self.max_model_length if self.mode == "colocate" else server_max_model_len
            llm = FakeLLM(self.model, self.processing_class, prefix_caching=prefix_caching,
                          seed=self.accelerator.process_index,
                          max_model_len=asked or self.model.config.max_position_embeddings)
            if self.mode == "colocate":
                self.llm = llm
            elif self.accelerator.is_main_process:  # as in TRL: only the main process talks to the server
                self.vllm_client = FakeVLLMClient(llm)
            self.fake_llm = llm
            if registry is not None:
                registry.append(self)

    return FakeEngineVLLMGeneration


def install(monkeypatch=None, prefix_caching: bool = True, server_max_model_len: int | None = None) -> list:
    """Makes ``use_vllm=True`` trainers start fake engines; returns the list the engines are added to.

    With a pytest ``monkeypatch`` the change is undone after the test; without one (a worker process)
    it lasts for the process.
    """
    import trl.trainer.grpo_trainer as grpo_module

    registry: list = []
    engine_class = fake_vllm_generation_class(prefix_caching, registry, server_max_model_len)
    if monkeypatch is None:
        vllm_generation.SamplingParams = FakeSamplingParams
        grpo_module.VLLMGeneration = engine_class
    else:
        monkeypatch.setattr(vllm_generation, "SamplingParams", FakeSamplingParams, raising=False)
        monkeypatch.setattr(grpo_module, "VLLMGeneration", engine_class)
    return registry
