"""Shared fixtures: a character-level tokenizer, a tiny random Llama, and a scripted Llama."""

from __future__ import annotations

import os
import string

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# The test models are tiny: one thread is faster than two, and far faster on a loaded machine.
torch.set_num_threads(int(os.environ.get("TRL_RESETS_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the real embedded model (minutes)")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


def make_tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_model(char_tokenizer):
    return make_tiny_llama(char_tokenizer)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, char_tokenizer):
    """A saved tiny Llama with the character tokenizer, for code that loads a model folder (one per test module)."""
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(char_tokenizer).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return str(folder)


class ScriptedLlama:
    """Builds a Llama whose greedy output follows a per-row script of token ids, then EOS.

    The real forward runs (so the KV cache is genuine); only the logits are replaced. The model must receive the
    cache: it finds it among the keyword arguments whatever transformers calls it, and a call without one is an
    error naming the cause, rather than a script replayed from the wrong position.

    Which script a row follows, and how far along it is:

    * ``prompts=None``: rows are numbered in the order of the first forward call on a fresh cache (row ``i``
      follows ``scripts[i % len(scripts)]``, also after the sampler drops or copies rows), and a row's step is
      the cache's length past that call's width. Right for a sampler that prefills every row in one call.
    * ``prompts`` given (token ids, one per script): each cache row keeps the real tokens it was fed (padding
      left out, by the attention mask), whatever calls they came in (a shared opening encoded once and copied to
      the rows, then each row's own tail, ...). A row whose tokens start with ``prompts[i]`` follows
      ``scripts[i]`` from the step its tokens past the prompt give; a row still inside its prompt gets EOS logits,
      which no sampler reads.
    """

    @staticmethod
    def build(tokenizer, scripts: list[list[int]], prompts: list[list[int]] | None = None):
        from transformers import Cache, LlamaForCausalLM

        if prompts is not None and len(prompts) != len(scripts):
            raise ValueError(f"{len(prompts)} prompts for {len(scripts)} scripts: give one prompt per script.")

        class _Scripted(LlamaForCausalLM):
            def _follow(self, cache, rows):
                """Keeps ``rows`` (one entry per cache row) in step with the rows the sampler selects or copies."""
                select = cache.batch_select_indices

                def follow(indices, select=select):
                    rows[:] = [list(rows[i]) if isinstance(rows[i], list) else rows[i] for i in indices.tolist()]
                    select(indices)

                cache.batch_select_indices = follow

            def _by_order(self, input_ids, cache, before):
                if before == 0:
                    self._width = input_ids.shape[1]
                    self._row_ids = list(range(input_ids.shape[0]))
                    self._follow(cache, self._row_ids)
                step = before + input_ids.shape[1] - self._width  # the cache's length once this call is in it
                return [(self._row_ids[row] % len(self.scripts), step) for row in range(input_ids.shape[0])]

            def _by_prompt(self, input_ids, cache, before, attention_mask):
                if before == 0:
                    cache._fed = [[] for _ in range(input_ids.shape[0])]
                    self._follow(cache, cache._fed)
                fed = cache._fed
                if len(fed) != input_ids.shape[0]:
                    raise AssertionError(f"{input_ids.shape[0]} rows fed to a cache that holds {len(fed)}: rows "
                                         "joined it without the cache's batch_select_indices, which this model "
                                         "cannot follow.")
                width = input_ids.shape[1]
                real = (attention_mask[:, -width:] if attention_mask is not None
                        else torch.ones_like(input_ids)).bool()
                placed = []
                for row in range(input_ids.shape[0]):
                    fed[row] += input_ids[row][real[row]].tolist()
                    matches = [i for i, p in enumerate(self.prompts) if fed[row][:len(p)] == p]
                    # the longest matching prompt: one prompt may open another
                    i = max(matches, key=lambda m: len(self.prompts[m]), default=None)
                    placed.append((None, 0) if i is None else (i, len(fed[row]) - len(self.prompts[i])))
                return placed

            def forward(self, input_ids=None, **kwargs):
                caches = [value for value in kwargs.values() if isinstance(value, Cache)]
                cache = caches[0] if caches else None
                if cache is None:
                    raise AssertionError(
                        "the scripted model was called with no KV cache among its keyword arguments "
                        f"({sorted(kwargs)}): transformers passes the cache under a name the caller did not use "
                        "(see trl_resets.sampling.transformers_backend.cache_kwarg)")
                before = cache.get_seq_length()
                if self.prompts is None:
                    placed = self._by_order(input_ids, cache, before)
                else:
                    placed = self._by_prompt(input_ids, cache, before, kwargs.get("attention_mask"))
                out = super().forward(input_ids=input_ids, **kwargs)
                logits = torch.full_like(out.logits[:, -1:, :], -1e4)
                for row, (script_index, step) in enumerate(placed):
                    script = [] if script_index is None else self.scripts[script_index]
                    token = script[step] if 0 <= step < len(script) else self.config.eos_token_id
                    logits[row, 0, token] = 1e4
                out.logits = logits
                return out

        model = _Scripted(make_tiny_llama(tokenizer).config)
        model.scripts = scripts
        model.prompts = None if prompts is None else [list(p) for p in prompts]
        model.generation_config.do_sample = False
        return model


@pytest.fixture(scope="session", autouse=True)
def _caches_in_a_temporary_folder(tmp_path_factory):
    """No test writes the user's caches: the package's, Hugging Face's, matplotlib's and torch's point at a
    temporary folder for the session (subprocesses inherit them). ``datasets`` read its cache path when it
    was imported, so its module constants follow too."""
    root = tmp_path_factory.mktemp("cache")
    env = {
        "XDG_CACHE_HOME": root, "TRL_RESETS_CACHE": root / "trl_resets", "HF_HOME": root / "huggingface",
        "HF_DATASETS_CACHE": root / "huggingface" / "datasets", "MPLCONFIGDIR": root / "matplotlib",
        "TORCH_EXTENSIONS_DIR": root / "torch_extensions", "TRITON_CACHE_DIR": root / "triton",
    }
    import datasets.config

    datasets_cache = root / "huggingface" / "datasets"
    constants = {"HF_DATASETS_CACHE": datasets_cache, "DOWNLOADED_DATASETS_PATH": datasets_cache / "downloads",
                 "EXTRACTED_DATASETS_PATH": datasets_cache / "downloads" / "extracted"}
    with pytest.MonkeyPatch.context() as patch:
        for name, path in env.items():
            patch.setenv(name, str(path))
        for name, path in constants.items():
            patch.setattr(datasets.config, name, path)
        yield root
