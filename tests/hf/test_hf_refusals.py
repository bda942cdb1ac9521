"""export_hf.py and import_hf.py never destroy work and never pass off a broken model: hostile output paths, inputs
and configs through the real command line, each refused with exit 2 and one line, every earlier file byte-identical;
an output written by another command meanwhile is kept; a full disk is one line; weights with a NaN anywhere are
refused; a real SIGINT / SIGTERM during the work stops with one line and leaves nothing."""
import json
import os
import shutil
import signal

import pytest
import torch

import export_hf
import import_hf
from helpers import WRITING, folder_snapshot, full_disk_after, refused_in_one_line, signalled_both, tiny_model
from src.hf import cli as hf_cli
from src.io import atomic
from src.io.checkpoint import load_weights, save_weights

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


def refused(main, prog, argv, capsys, *expected) -> str:
    return refused_in_one_line([str(a) for a in argv], capsys, *expected, main=main, prog=prog)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A folder with model.pth (tiny, two layers) and hf/, its export."""
    folder = tmp_path_factory.mktemp("sources")
    save_weights(tiny_model(n_layer=2).state_dict(), folder / "model.pth")
    assert export_hf.main([str(folder / "model.pth"), str(folder / "hf")]) == 0
    return folder


@pytest.fixture
def work(sources, tmp_path):
    """A copy of the sources for one test, with a file of someone's notes beside them."""
    shutil.copy(sources / "model.pth", tmp_path / "model.pth")
    shutil.copytree(sources / "hf", tmp_path / "hf")
    (tmp_path / "notes.txt").write_text("someone's work")
    return tmp_path


def nan_in_an_unused_row(work):
    """A NaN in an embedding row that none of the check's CHECK_TOKENS tokens reads."""
    weights = load_weights(work / "model.pth")
    used = set(torch.randint(0, 37, (1, hf_cli.CHECK_TOKENS), generator=torch.Generator().manual_seed(0)).flatten())
    row = next(i for i in range(37) if i not in {int(t) for t in used})
    weights["emb.weight"][row, 3] = float("nan")
    save_weights(weights, work / "model.pth")


def beyond_fp16(work):
    weights = load_weights(work / "model.pth")
    weights["head.weight"][0, 0] = 1e6
    save_weights(weights, work / "model.pth")


def config_with(work, **changes):
    config = json.loads((work / "hf" / "config.json").read_text())
    (work / "hf" / "config.json").write_text(json.dumps({**config, **changes}))


def nan_in_the_folder(work):
    weights = load_file(work / "hf" / "model.safetensors")
    weights["rwkv.blocks.1.feed_forward.value.weight"][2, 5] = float("inf")
    save_file(weights, work / "hf" / "model.safetensors", metadata={"format": "pt"})


# (how to spoil the copy, the working folder relative to it, argv relative to it, words of the refusal)
EXPORT_CASES = {
    "out is the working folder, holding the model": (None, ".", ["--overwrite", "model.pth", "."], ["holds MODEL"]),
    "out is the parent of the working folder": (None, "hf", ["--overwrite", "../model.pth", ".."], ["holds MODEL"]),
    "out is the working folder": (None, "hf", ["--overwrite", "../model.pth", "."], ["is the working folder"]),
    "out holds the working folder": (lambda w: (w / "hf" / "sub").mkdir(), "hf/sub",
                                     ["--overwrite", "../../model.pth", ".."], ["is the working folder or holds it"]),
    "out is the model": (None, ".", ["model.pth", "model.pth"], ["is a file"]),
    "out holds the tokenizer": (lambda w: shutil.copy(w / "hf" / "config.json", w / "hf" / "tokenizer.json"), ".",
                                ["--overwrite", "--vocab", "hf/tokenizer.json", "model.pth", "hf"],
                                ["holds --vocab hf/tokenizer.json"]),
    "out is not empty": (None, ".", ["model.pth", "hf"], ["not empty", "--overwrite"]),
    "out under a file": (None, ".", ["model.pth", "notes.txt/hf"], ["is a file, not a folder"]),
    "a NaN the check's tokens never read": (nan_in_an_unused_row, ".", ["model.pth", "out"],
                                            ["non-finite values", "emb.weight"]),
    "fp16 overflows": (beyond_fp16, ".", ["model.pth", "out", "--dtype", "fp16"],
                       ["rounded to fp16 holds infinities in head.weight"]),
    "huge --ctx_len": (None, ".", ["model.pth", "out", "--ctx_len", "99999999999999999999"], ["--ctx_len must be"]),
    "zero --ctx_len": (None, ".", ["model.pth", "out", "--ctx_len", "0"], ["--ctx_len must be 1.."]),
    "model is a folder": (None, ".", ["hf", "out"], ["is a folder"]),
    "model is text": (None, ".", ["notes.txt", "out"], ["notes.txt"]),
    "model is a named pipe": (lambda w: os.mkfifo(w / "pipe"), ".", ["pipe", "out"], ["is not a regular file"]),
    "tokenizer is a named pipe": (lambda w: os.mkfifo(w / "pipe.json"), ".", ["model.pth", "out", "--vocab",
                                                                            "pipe.json"],
                                  ["--vocab pipe.json is not a regular file"]),
}


@pytest.mark.parametrize("spoil, cwd, argv, words", EXPORT_CASES.values(), ids=EXPORT_CASES.keys())
def test_export_refuses_in_one_line_and_changes_nothing(work, capsys, monkeypatch, spoil, cwd, argv, words):
    if spoil:
        spoil(work)
    before = folder_snapshot(work)
    monkeypatch.chdir(work / cwd)
    refused(export_hf.main, "export_hf.py", argv, capsys, *words)
    assert folder_snapshot(work) == before
    assert not [p for p in work.rglob(".*")]


IMPORT_CASES = {
    "out inside the input": (None, ["--overwrite", "hf", "hf/model.safetensors"], ["lies inside HF_DIR hf"]),
    "out is the input": (None, ["--overwrite", "hf", "hf"], ["is a folder"]),
    "out is the working folder": (None, ["hf", "."], ["is a folder"]),
    "out exists": (None, ["hf", "notes.txt"], ["already exists", "--overwrite"]),
    "out is a named pipe": (lambda w: os.mkfifo(w / "pipe.pth"), ["--overwrite", "hf", "pipe.pth"],
                            ["is not a regular file"]),
    "out is the input's config": (None, ["--overwrite", "hf", "hf/config.json"], ["lies inside HF_DIR"]),
    "hidden_size of another model": (lambda w: config_with(w, hidden_size=32), ["hf", "out.pth"],
                                     ["config.json does not describe the weights beside it: hidden_size 32 where the "
                                      "weights have 16; the folder's files come from different models"]),
    "vocab_size of another model": (lambda w: config_with(w, vocab_size=50277), ["hf", "out.pth"],
                                    ["vocab_size 50277 where the weights have 37"]),
    "intermediate_size of another model": (lambda w: config_with(w, intermediate_size=8), ["hf", "out.pth"],
                                           ["intermediate_size 8 where the weights have 64"]),
    "a layer more": (lambda w: config_with(w, num_hidden_layers=3), ["hf", "out.pth"],
                     ["num_hidden_layers 3 where the weights have 2"]),
    "a billion layers": (lambda w: config_with(w, num_hidden_layers=10 ** 9), ["hf", "out.pth"],
                         ["num_hidden_layers 1000000000 where"]),
    "hidden_size beyond any machine": (lambda w: config_with(w, hidden_size=10 ** 30), ["hf", "out.pth"],
                                       [f"hidden_size {10 ** 30} where the weights have 16"]),
    "a weight missing": (lambda w: save_file({k: v for k, v in load_file(w / "hf" / "model.safetensors").items()
                                              if "blocks.1.attention.key" not in k}, w / "hf" / "model.safetensors",
                                             metadata={"format": "pt"}), ["hf", "out.pth"],
                         ["missing keys (1): rwkv.blocks.1.attention.key.weight"]),
    "hidden_size text": (lambda w: config_with(w, hidden_size="16"), ["hf", "out.pth"], ["hidden_size is '16'"]),
    "config not JSON": (lambda w: (w / "hf" / "config.json").write_bytes(b"\xff{"), ["hf", "out.pth"],
                        ["cannot be read as JSON"]),
    "an infinity in the weights": (nan_in_the_folder, ["hf", "out.pth"],
                                   ["non-finite values", "rwkv.blocks.1.feed_forward.value.weight"]),
}


@pytest.mark.parametrize("spoil, argv, words", IMPORT_CASES.values(), ids=IMPORT_CASES.keys())
def test_import_refuses_in_one_line_and_changes_nothing(work, capsys, monkeypatch, spoil, argv, words):
    if spoil:
        spoil(work)
    before = folder_snapshot(work)
    monkeypatch.chdir(work)
    refused(import_hf.main, "import_hf.py", argv, capsys, *words)
    assert folder_snapshot(work) == before
    assert not [p for p in work.rglob(".*")]


def another_command_writes(monkeypatch, path, content=b"the other command's"):
    """While the command checks its output, another command writes `path`."""
    check = hf_cli.check_logits

    def check_and_a_newcomer(*args, **kwargs):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        return check(*args, **kwargs)

    monkeypatch.setattr(hf_cli, "check_logits", check_and_a_newcomer)


@pytest.mark.parametrize("existing", [False, True])
def test_export_keeps_a_file_written_into_out_dir_meanwhile(work, capsys, monkeypatch, existing):
    """A new OUT_DIR that another command created, or an old one (--overwrite) that it wrote into: kept as it is."""
    argv = ["model.pth", "hf", "--overwrite"] if existing else ["model.pth", "new"]
    newcomer = work / argv[1] / "theirs.txt"
    another_command_writes(monkeypatch, newcomer)
    monkeypatch.chdir(work)
    expected = folder_snapshot(work)
    refused(export_hf.main, "export_hf.py", argv, capsys, "was written by another command while this one ran")
    assert folder_snapshot(work) == {**expected, f"{argv[1]}/theirs.txt": b"the other command's"}
    assert not [p for p in work.rglob(".*")]


@pytest.mark.parametrize("existing", [False, True])
def test_import_keeps_an_out_pth_written_meanwhile(work, capsys, monkeypatch, existing):
    argv = ["hf", "notes.txt", "--overwrite"] if existing else ["hf", "out.pth"]
    another_command_writes(monkeypatch, work / argv[1])
    monkeypatch.chdir(work)
    refused(import_hf.main, "import_hf.py", argv, capsys, "was written by another command while this one ran")
    assert (work / argv[1]).read_bytes() == b"the other command's"
    assert not [p for p in work.rglob(".*")]


def test_overwrite_replaces_what_the_check_found(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (work / "hf" / "stale.txt").write_text("from before")
    assert export_hf.main(["model.pth", "hf", "--overwrite"]) == 0
    assert not (work / "hf" / "stale.txt").exists() and (work / "hf" / "model.safetensors").is_file()
    assert import_hf.main(["hf", "notes.txt", "--overwrite"]) == 0
    assert load_weights(work / "notes.txt").keys() == load_weights(work / "model.pth").keys()
    assert not [p for p in work.rglob(".*")]


def test_a_full_disk_is_one_line(work, capsys, monkeypatch):
    """safetensors reports a full disk as its own error (export); torch.save's writes pass through atomic (import)."""
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", no_space)
    monkeypatch.setattr(atomic, "_write", full_disk_after(1000))
    monkeypatch.chdir(work)
    before = folder_snapshot(work)
    weights = sum(t.numel() * t.element_size() for t in load_weights(work / "model.pth").values())
    needed = f"(about {weights / 1000:.3g} kB needed, "
    refused(export_hf.main, "export_hf.py", ["model.pth", "out"], capsys, "no space left on the device of out for "
            "model.safetensors " + needed, " free); make room there")
    refused(import_hf.main, "import_hf.py", ["hf", "out.pth"], capsys, "no space left on the device of . for out.pth "
            + needed)
    assert folder_snapshot(work) == before and not [p for p in work.rglob(".*")]


def partial_in(folder):
    """Whether a temporary output folder exists in `folder` and holds files: export writes or checks it."""
    def ready(printed):
        try:
            return any(p.name.endswith(".partial") and any(p.iterdir()) for p in folder.iterdir())
        except OSError:  # gone meanwhile
            return False
    return ready


def writing(folder):
    return lambda printed: WRITING in printed


@pytest.mark.parametrize("script, source, out, ready, slow_writes", [
    ("export_hf.py", "model.pth", "out", partial_in, 0.0),  # while it writes or checks the temporary folder
    ("import_hf.py", "hf", "out.pth", writing, 0.5),  # inside torch.save's writes, each slowed down
])
def test_sigint_and_sigterm_during_the_work_leave_nothing(sources, tmp_path, script, source, out, ready, slow_writes):
    """A real SIGINT and a real SIGTERM, each to its own process, while the output exists under its temporary name:
    one line each, exit 130 / 143, no temporary file left, every earlier file as it was."""
    copies = {signum: shutil.copytree(sources, tmp_path / signum.name) for signum in (signal.SIGINT, signal.SIGTERM)}
    before = {signum: folder_snapshot(copy) for signum, copy in copies.items()}
    results = signalled_both(script, {signum: ([copy / source, copy / out], ready(copy))
                                      for signum, copy in copies.items()}, slow_writes=slow_writes)
    for signum, (returncode, printed, err) in results.items():
        assert returncode == 128 + signum, (printed, err)
        assert err == f"{script}: {signum.name}: stopped; nothing was written\n", err
        assert folder_snapshot(copies[signum]) == before[signum] and not list(copies[signum].rglob(".*"))
