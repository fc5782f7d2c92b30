"""pytest plugin for `trl_yardstick.py`: runs TRL's own GRPOTrainer tests offline, against TRL's trainer or ours.

Loaded with ``-p trl_yardstick_plugin``; the mode comes from ``TRL_YARDSTICK_MODE``:

* ``trl``: TRL's `GRPOTrainer` and `GRPOConfig`, untouched (the baseline);
* ``grpo``: `trl_resets.GRPOBaselineTrainer` with ``num_reset_prefixes=0`` and G1 = the test's num_generations;
* ``resets``: `trl_resets.RRPOTrainer` (or SRPO, ``TRL_YARDSTICK_RESET_TRAINER=srpo``) with a split
  G1 + 1 x G2 = num_generations whose groups have at least 2 rows; a test whose num_generations has none is
  skipped as not applicable.

In every mode the hub ids the tests name are served by local stand-ins built here: tiny random-weight models of
the same architectures (from transformers' config classes) with a character-level tokenizer, and small datasets
with the columns of the ``trl-internal-testing/zen`` configs (our own text). Each test's outcome is written as
one JSON line to ``TRL_YARDSTICK_RESULTS``; a ValueError or TypeError that trl_resets raises while building its
config or trainer is recorded as a refusal, with its message.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import torch

MODE = os.environ.get("TRL_YARDSTICK_MODE", "trl")
RESULTS = os.environ.get("TRL_YARDSTICK_RESULTS")
RESET_TRAINER = os.environ.get("TRL_YARDSTICK_RESET_TRAINER", "rrpo")
STANDIN_DIR = Path(os.environ["TRL_YARDSTICK_STANDINS"]) if os.environ.get("TRL_YARDSTICK_STANDINS") else None
TEST_MODULE = "test_grpo_trainer"

# architecture prefix in a trl-internal-testing id -> transformers model type
MODEL_TYPES = {
    "Qwen2": "qwen2", "Qwen3": "qwen3", "Qwen3Moe": "qwen3_moe", "Llama": "llama", "Mistral": "mistral",
    "Gemma2": "gemma2", "Cohere2": "cohere2", "Glm4Moe": "glm4_moe", "GptOss": "gpt_oss", "NemotronH": "nemotron_h",
}
HEADS = ("ForCausalLM", "ForSequenceClassification")
SMALL = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 4, "max_position_embeddings": 1024,
}
# mixture-of-experts models, under the names their configs use; the router loss is on, as in TRL's models
MOE = {
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "n_shared_experts": 1, "first_k_dense_replace": 0, "output_router_logits": True,
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# our own prompts, with the columns of the zen configs the tests load ("prompt": text, or one user message); fewer
# rows than the real configs, so that a test's one epoch takes a few steps
PROMPTS = [
    "The shortest path between two points", "A river that forgets its source", "Count the stones before",
    "Every clock in the house", "When the lamp is lit", "Plant the seed and then",
]
TEST_PROMPTS = ["Begin at the beginning and", "A question worth asking is"]


# ---------------------------------------------------------------------------------------------- stand-ins
def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=specials[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _parse_model_id(model_id: str) -> tuple[str, str] | None:
    """'trl-internal-testing/tiny-Qwen2ForCausalLM-2.5' -> ('qwen2', 'ForCausalLM'); None for ids we don't serve."""
    if not isinstance(model_id, str) or not model_id.startswith("trl-internal-testing/tiny-"):
        return None
    name = model_id.split("/", 1)[1][len("tiny-"):].split("-", 1)[0]
    for head in HEADS:
        if name.endswith(head) and name[: -len(head)] in MODEL_TYPES:
            return MODEL_TYPES[name[: -len(head)]], head
    return None


def standin_model(model_id: str) -> str | None:
    """The local folder standing in for a hub model id (built on first use), or None when we have none."""
    parsed = _parse_model_id(model_id)
    if parsed is None:
        return None
    folder = STANDIN_DIR / "models" / model_id.replace("/", "--")
    if (folder / "config.json").exists():
        return str(folder)
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_type, head = parsed
    tokenizer = _char_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, num_labels=1, **SMALL,
        **(MOE if "moe" in model_type or model_type == "gpt_oss" else {}),
    )
    torch.manual_seed(sum(map(ord, model_id)))
    auto = AutoModelForCausalLM if head == "ForCausalLM" else AutoModelForSequenceClassification
    model = auto.from_config(config)
    assert type(model) is getattr(transformers, type(model).__name__)
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = tempfile.mkdtemp(dir=folder.parent)  # then renamed at once: parallel runs share the folder
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)
    try:
        os.rename(building, folder)
    except OSError:  # another run built it first
        shutil.rmtree(building)
    return str(folder)


def _dataset_files(config_name: str) -> dict[str, str]:
    folder = STANDIN_DIR / "datasets" / config_name
    files = {"train": folder / "train.jsonl", "test": folder / "test.jsonl"}
    if not files["train"].exists():
        folder.mkdir(parents=True, exist_ok=True)
        for split, prompts in (("train", PROMPTS), ("test", TEST_PROMPTS)):
            with open(files[split], "w") as f:
                for text in prompts:
                    prompt = text if config_name.startswith("standard") else [{"role": "user", "content": text}]
                    f.write(json.dumps({"prompt": prompt}) + "\n")
    return {split: str(path) for split, path in files.items()}


def standin_load_dataset(real_load_dataset):
    def load_dataset(path, name=None, *args, **kwargs):
        if path == "trl-internal-testing/zen" and name in ("standard_prompt_only", "conversational_prompt_only"):
            return real_load_dataset("json", *args, data_files=_dataset_files(name), **kwargs)
        if isinstance(path, str) and path.startswith("trl-internal-testing/"):
            raise FileNotFoundError(f"the yardstick has no offline stand-in for dataset {path!r} ({name!r})")
        return real_load_dataset(path, name, *args, **kwargs)

    return load_dataset


def _redirect(cls, attribute="from_pretrained"):
    """Makes ``cls.from_pretrained(model_id, ...)`` load the stand-in folder for the hub ids we serve."""
    original = inspect.getattr_static(cls, attribute).__func__

    def from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs):
        local = standin_model(pretrained_model_name_or_path)
        return original(klass, local or pretrained_model_name_or_path, *args, **kwargs)

    setattr(cls, attribute, classmethod(from_pretrained))


def _install_standins():
    import datasets
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedConfig, PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from trl import import_utils

    for cls in (AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
                _BaseAutoModelClass):
        _redirect(cls)
    datasets.load_dataset = standin_load_dataset(datasets.load_dataset)
    # TRL's tests/testing_utils.py (main) imports a helper that trl 1.16 does not have yet
    if not hasattr(import_utils, "is_joblib_available"):
        import_utils.is_joblib_available = lambda: importlib.util.find_spec("joblib") is not None


# ---------------------------------------------------------------------------------------------- our trainers
def _mark_refusal(error: BaseException) -> BaseException:
    error._yardstick_refused = True
    return error


def reset_split(num_generations: int) -> tuple[int, int] | None:
    """(G1, G2) with G1 + 1 x G2 = num_generations, every group at least 2 rows (G1 may be 0); G1 as large as G2
    allows (8 -> 4 + 1x4, 4 -> 2 + 1x2, 3 -> 0 + 1x3)."""
    reset_rows = num_generations // 2
    if reset_rows >= 2 and num_generations - reset_rows != 1:
        return num_generations - reset_rows, reset_rows
    if num_generations >= 2:
        return 0, num_generations
    return None


def _our_classes():
    from trl import GRPOConfig

    from trl_resets import GRPOBaselineTrainer, ResetConfig, RRPOConfig, RRPOTrainer, SRPOConfig, SRPOTrainer

    if MODE == "grpo":
        config_class, trainer_class = ResetConfig, GRPOBaselineTrainer
    elif RESET_TRAINER == "srpo":
        config_class, trainer_class = SRPOConfig, SRPOTrainer
    else:
        config_class, trainer_class = RRPOConfig, RRPOTrainer
    default_generations = next(f.default for f in GRPOConfig.__dataclass_fields__.values()
                               if f.name == "num_generations")

    def config(*args, **kwargs):
        """GRPOConfig's keywords onto our config: the split from num_generations, everything else as given."""
        n = kwargs.pop("num_generations", default_generations)
        if MODE == "grpo":
            split = {"num_base_generations": n, "num_reset_prefixes": 0}
        else:
            found = reset_split(n)
            if found is None:
                pytest.skip(f"not applicable: num_generations={n} has no split with groups of 2 or more rows")
            split = {"num_base_generations": found[0], "num_reset_prefixes": 1, "num_reset_generations": found[1]}
        try:
            return config_class(*args, num_generations=n, **split, **kwargs)
        except (ValueError, TypeError) as error:
            raise _mark_refusal(error)

    class Trainer(trainer_class):
        def __init__(self, model, reward_funcs=None, args=None, *rest, **kwargs):
            if args is None:
                name = model if isinstance(model, str) else model.config._name_or_path
                args = config(output_dir=f"{str(name).split('/')[-1]}-GRPO")
            try:
                super().__init__(model, reward_funcs, args, *rest, **kwargs)
            except (ValueError, TypeError, NotImplementedError) as error:
                if _raised_in_trl_resets(error):
                    raise _mark_refusal(error)
                raise

    Trainer.__name__ = Trainer.__qualname__ = f"Yardstick{trainer_class.__name__}"
    return config, Trainer


def _raised_in_trl_resets(error: BaseException) -> bool:
    import trl_resets

    package = os.path.dirname(trl_resets.__file__)
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and last.startswith(package)


# ---------------------------------------------------------------------------------------------- hooks
def pytest_configure(config):
    global STANDIN_DIR
    if STANDIN_DIR is None:
        STANDIN_DIR = Path(tempfile.mkdtemp(prefix="trl-yardstick-"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _install_standins()


def pytest_collection_modifyitems(session, config, items):
    import datasets

    swapped = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None or not module.__name__.endswith(TEST_MODULE) or module in swapped:
            continue
        swapped.add(module)
        module.load_dataset = datasets.load_dataset
        if MODE != "trl":
            module.GRPOConfig, module.GRPOTrainer = _our_classes()


_outcomes: dict[str, dict] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and getattr(call.excinfo.value, "_yardstick_refused", False):
        report.yardstick_refused = f"{type(call.excinfo.value).__name__}: {call.excinfo.value}"


def _one_line(report) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr or "")
    return " ".join(text.split())[:300]


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        _write()
    entry = _outcomes.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "reason": ""})
    if report.when == "call" and report.passed and not hasattr(report, "wasxfail"):
        return
    if report.passed and not hasattr(report, "wasxfail"):
        return
    if entry["outcome"] != "passed":  # keep the first non-pass (a teardown error after a failure adds nothing)
        return
    if getattr(report, "yardstick_refused", None):
        entry.update(outcome="refused", reason=" ".join(report.yardstick_refused.split())[:400])
    elif hasattr(report, "wasxfail"):
        entry.update(outcome="xfailed" if report.skipped else "xpassed", reason=_one_line(report))
    elif report.skipped:
        reason = _one_line(report)
        entry.update(outcome="not applicable" if reason.startswith("not applicable") else "skipped", reason=reason)
    else:
        entry.update(outcome="failed" if report.when == "call" else "error", reason=_one_line(report))


def pytest_sessionfinish(session, exitstatus):
    _write()


def _write():
    """All outcomes so far (rewritten after each test, so that an interrupted run keeps them)."""
    if RESULTS:
        with open(RESULTS, "w") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in _outcomes.values())
