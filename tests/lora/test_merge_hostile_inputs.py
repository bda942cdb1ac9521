"""Never lose work (issue 35), merge_lora.py and merge_lora_plus.py: hostile or careless inputs through the real command
line (each main), in a folder that holds a base model, its LoRA file and an earlier merge. Each row: exit 2, one line on
stderr naming the file or argument, no traceback, and every earlier file byte-identical (no partial file left). Real
SIGINT and SIGTERM during the writes, and a second Ctrl+C during the first one's cleanup, leave nothing either."""
import copy
import os
import shutil
import signal

import pytest
import torch

import merge_lora
import merge_lora_plus
from helpers import CLEANING, WRITING, folder_snapshot, refused_in_one_line, signalled, signalled_both, tiny_model
from src.io.checkpoint import load_weights, save_weights
from src.lora.adapters import SETTINGS_KEY, apply_lora, lora_state_dict, trainable_names
from src.lora.settings import LoraSettings

MAINS = {"merge_lora.py": merge_lora.main, "merge_lora_plus.py": merge_lora_plus.main}


def lora_of(base, seed=1):
    """The LoRA file of `base` (every part, every layer, trained tensors moved from their start)."""
    model = copy.deepcopy(base)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, parts=("att", "ffn", "time", "ln"), layers=(0, 1))
    apply_lora(model, settings)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable_names(model, settings):
                p.add_(0.1 * torch.randn_like(p))
    return lora_state_dict(model, settings)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """base.pth (two layers), lora.pth (its LoRA), wide_lora.pth (a LoRA of a wider model), merged.pth (an earlier
    merge)."""
    folder = tmp_path_factory.mktemp("merge_sources")
    base = tiny_model(n_layer=2).eval()
    save_weights(base.state_dict(), folder / "base.pth")
    save_weights(lora_of(base), folder / "lora.pth")
    save_weights(lora_of(tiny_model(n_layer=2, n_embd=32).eval()), folder / "wide_lora.pth")
    assert merge_lora.main([str(folder / "base.pth"), str(folder / "lora.pth"), str(folder / "merged.pth")]) == 0
    return folder


@pytest.fixture
def work(sources, tmp_path):
    """A copy of the sources for one test, and the hostile files the rows name."""
    folder = shutil.copytree(sources, tmp_path / "work")
    (folder / "truncated.pth").write_bytes((folder / "base.pth").read_bytes()[:3000])
    (folder / "garbage.pth").write_bytes(os.urandom(5000))
    (folder / "notes.txt").write_text("someone's notes")
    (folder / "a_folder.pth").mkdir()
    os.mkfifo(folder / "pipe.pth")  # a reader would wait on it for ever
    os.link(folder / "lora.pth", folder / "lora_link.pth")  # the LoRA file under another name
    pair_of_rank_0 = {k: v for k, v in load_weights(folder / "lora.pth").items() if k != SETTINGS_KEY}
    pair_of_rank_0.update({"blocks.0.att.key.lora_A": torch.zeros(0, 16),
                           "blocks.0.att.key.lora_B": torch.zeros(16, 0)})
    save_weights(pair_of_rank_0, folder / "rank_0.pth")
    return folder


ROWS = {  # name: (argv, texts the one line holds); plus=True rows run merge_lora_plus.py
    "missing base": (["nope.pth", "lora.pth", "out.pth"], ["base model: file not found: nope.pth"]),
    "base is a folder": (["a_folder.pth", "lora.pth", "out.pth"], ["base model a_folder.pth is a folder"]),
    "base is a named pipe": (["pipe.pth", "lora.pth", "out.pth"],
                             ["base model pipe.pth is not a regular file (a named pipe or a device)"]),
    "base is a LoRA file": (["lora.pth", "lora.pth", "out.pth"], ["lora.pth is itself a LoRA checkpoint"]),
    "LoRA file is a base": (["8", "base.pth", "base.pth", "out.pth"],
                            ["base.pth holds emb.weight", "is it a full model rather than a LoRA checkpoint?"]),
    "LoRA of another width": (["base.pth", "wide_lora.pth", "out.pth"],
                              ["wide_lora.pth was trained on another base model than base.pth", "n_embd 32 vs 16"]),
    "truncated base": (["truncated.pth", "lora.pth", "out.pth"], ["truncated.pth is a damaged PyTorch file"]),
    "garbage LoRA file": (["base.pth", "garbage.pth", "out.pth"], ["garbage.pth is not a PyTorch file"]),
    "LoRA pair of rank 0": (["8", "base.pth", "rank_0.pth", "out.pth"],
                            ["blocks.0.att.key.lora_A (0, 16)", "r >= 1"]),
    "output is the base": (["--overwrite", "base.pth", "lora.pth", "base.pth"],
                           ["the output base.pth is the base model base.pth, which writing it would destroy"]),
    "output is the LoRA file under another name": (["--overwrite", "base.pth", "lora.pth", "lora_link.pth"],
                                                   ["the output lora_link.pth is the LoRA checkpoint lora.pth"]),
    "output inside the base": (["base.pth", "lora.pth", "base.pth/merged.pth"],
                               ["the output base.pth/merged.pth lies inside the base model base.pth"]),
    "output exists": (["base.pth", "lora.pth", "merged.pth"],
                      ["the output merged.pth already exists", "pass --overwrite to replace it"]),
    "output is a named pipe": (["--overwrite", "base.pth", "lora.pth", "pipe.pth"],
                               ["the output pipe.pth is not a regular file"]),
    "output is a folder": (["base.pth", "lora.pth", "a_folder.pth"], ["the output a_folder.pth is a folder"]),
    "output folder under a file": (["base.pth", "lora.pth", "notes.txt/new/out.pth"],
                                   ["notes.txt is a file, not a folder"]),
    "negative alpha": (["--", "-8", "base.pth", "lora.pth", "out.pth"], ["lora_alpha must be a positive number"]),
    "zero alpha": (["0", "base.pth", "lora.pth", "out.pth"], ["lora_alpha must be a positive number (got '0')"]),
    "NaN alpha": (["nan", "base.pth", "lora.pth", "out.pth"], ["lora_alpha must be a positive number (got 'nan')"]),
    "alpha beyond a float": (["1e400", "base.pth", "lora.pth", "out.pth"], ["(got '1e400')"]),
    "alpha other than stored": (["16", "base.pth", "lora.pth", "out.pth"], ["lora_alpha 16 given disagrees"]),
    "too many arguments": (["8", "base.pth", "lora.pth", "out.pth", "more.pth"], ["got 5 arguments"]),
    "a layer range beyond any model": (["--layer_filter", "0-99999999999999999999", "base.pth", "lora.pth", "out.pth"],
                                       ["--layer_filter lists layer 99999999999999999999; no model has"], True),
    "a NaN coefficient": (["--layer_filter", "nan*0-1", "base.pth", "lora.pth", "out.pth"],
                          ["--layer_filter: 'nan' in 'nan*0-1' is not a number"], True),
}


@pytest.mark.parametrize("name", ROWS)
def test_hostile_input_is_one_line_and_loses_nothing(name, work, capsys, monkeypatch):
    argv, expected, *plus = ROWS[name]
    prog = "merge_lora_plus.py" if plus else "merge_lora.py"
    monkeypatch.chdir(work)
    before = folder_snapshot(work)
    refused_in_one_line(argv, capsys, *expected, main=MAINS[prog], prog=prog)
    assert folder_snapshot(work) == before
    assert not [p for p in work.rglob(".*")] and not (work / "out.pth").exists()


def test_a_missing_output_folder_is_created(work, capsys, monkeypatch):
    """As every tool does: the folders of an output path are made (only once the merge is checked)."""
    monkeypatch.chdir(work)
    assert merge_lora.main(["base.pth", "lora.pth", "new/folder/out.pth"]) == 0
    assert load_weights(work / "new" / "folder" / "out.pth").keys() == load_weights(work / "merged.pth").keys()


@pytest.mark.parametrize("script", MAINS)
def test_sigint_and_sigterm_during_the_writes_leave_nothing(sources, tmp_path, script):
    """A real SIGINT and a real SIGTERM, each to its own process, while torch.save writes the merge (each write
    slowed down): one line each, exit 130 / 143, no temporary file, an earlier merge given --overwrite as it was."""
    copies = {signum: shutil.copytree(sources, tmp_path / signum.name) for signum in (signal.SIGINT, signal.SIGTERM)}
    before = {signum: folder_snapshot(copy) for signum, copy in copies.items()}
    results = signalled_both(script, {signum: (["--overwrite", copy / "base.pth", copy / "lora.pth",
                                                copy / "merged.pth"], lambda printed: WRITING in printed)
                                      for signum, copy in copies.items()}, slow_writes=0.5)
    for signum, (returncode, printed, err) in results.items():
        assert returncode == 128 + signum, (printed, err)
        assert err == f"{script}: {signum.name}: stopped; nothing was written\n", err
        assert folder_snapshot(copies[signum]) == before[signum] and not list(copies[signum].rglob(".*"))


def test_a_second_ctrl_c_during_the_cleanup_quits_at_once_and_leaves_nothing(sources, tmp_path):
    """Ctrl+C while the merge is written, and again while the temporary file is being removed: the second one quits
    at once (exit 130, its one line) and the hard exit still removes the temporary file."""
    work = shutil.copytree(sources, tmp_path / "work")
    before = folder_snapshot(work)
    returncode, printed, err = signalled("merge_lora.py", [work / "base.pth", work / "lora.pth", work / "out.pth"],
                                         signal.SIGINT, lambda out: WRITING in out, slow_writes=0.5, slow_cleanup=3,
                                         again=lambda out: CLEANING in out)
    assert returncode == 130, (printed, err)
    assert err == "\nSIGINT again: quitting at once; files already written are whole.\n", err
    assert folder_snapshot(work) == before and not list(work.rglob(".*"))
