"""train.py --valid_data_file: valid.tsv equals evaluate.py on the final file, training is unchanged, the
mini-epoch line and W&B, when it runs, LoRA runs, and its refusals."""
import json

import pytest
import torch

import evaluate
import train
from conftest import TINY_RUN
from helpers import folder_snapshot, refused_in_one_line
from src.eval import valid_tsv
from src.io.checkpoint import load_weights
from src.config import parse_args
from src.io.outputs import RunFiles, run_epochs
from src.train.resuming import shaping_flags
from src.train.held_out import evaluates_after


def evaluate_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert evaluate.main(argv) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def step_rows(proj_dir) -> list:
    """train_steps.tsv without its speed column (kt/s), which depends on the machine."""
    return [row.split("\t")[:-1] for row in (proj_dir / "train_steps.tsv").read_text().splitlines()]


def test_training_is_unchanged_by_held_out_evaluation(validated_run, finished_run):
    """The same run without --valid_data_file (and without W&B): the same steps, losses and weights, bit for bit."""
    proj_dir, _, _ = validated_run
    assert step_rows(proj_dir) == step_rows(finished_run)
    final, plain = load_weights(proj_dir / "rwkv-final.pth"), load_weights(finished_run / "rwkv-final.pth")
    assert final.keys() == plain.keys() and all(torch.equal(final[k], plain[k]) for k in final)


def test_a_row_per_mini_epoch_in_valid_tsv(validated_run):
    proj_dir, _, printed = validated_run
    lines = (proj_dir / "valid.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["epoch", "step", "loss", "perplexity", "tokens", "seconds", "loss_by_position"]
    rows = valid_tsv.read_rows(proj_dir)
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 2), (1, 4)]
    assert all(r["tokens"] == 1999 // 16 * 16 and r["perplexity"] == pytest.approx(2.718281828 ** r["loss"])
               for r in rows)
    assert rows[-1]["loss_by_position"] == [[0, 16, pytest.approx(rows[-1]["loss"], abs=1e-6)]]
    assert f"mini-epoch 1: valid loss {rows[-1]['loss']:.4f}, perplexity" in printed


def test_the_summary_names_valid_tsv_among_the_logs(validated_run):
    printed = validated_run[2]
    assert printed.splitlines()[-1].endswith("(log: train_log.txt, train_steps.tsv, valid.tsv)"), printed


def test_the_last_row_equals_evaluate_on_the_final_file(validated_run, capsys):
    proj_dir, held_out, _ = validated_run
    result = evaluate_json(capsys, ["--load_model", str(proj_dir / "rwkv-final.pth"), "--data_file", str(held_out),
                                    "--ctx_len", "16", "--micro_bsz", "2"])
    last = (proj_dir / "valid.tsv").read_text().splitlines()[-1].split("\t")
    assert last[2] == f"{result['loss']:.8f}" and int(last[4]) == result["tokens"]


def test_wandb_gets_the_held_out_loss_and_its_curve(validated_run):
    proj_dir, _, _ = validated_run
    (run,) = (proj_dir / "wandb").glob("offline-run-*")
    assert b"valid/loss" in next(run.glob("run-*.wandb")).read_bytes()
    tables = sorted((run / "files" / "media" / "table" / "valid").glob("loss_by_position_table_*.json"))
    assert len(tables) == 2 and json.loads(tables[-1].read_text())["columns"] == ["position", "loss"]


def test_a_lora_runs_last_row_equals_evaluate_on_its_base_and_lora(finished_run, validated_run, tmp_path, capsys):
    _, held_out, _ = validated_run
    base = finished_run / "rwkv-final.pth"
    argv = [*TINY_RUN, "--proj_dir", str(tmp_path / "lora"), "--load_model", str(base), "--lora", "--lora_r", "4",
            "--lora_parts", "att,ffn,time,ln", "--lora_dropout", "0.2", "--lr_init", "1e-2", "--epoch_count", "1",
            "--valid_data_file", str(held_out), "--valid_data_type", "utf-8", "--valid_tokens", "801"]
    assert train.main(argv) == 0
    (row,) = valid_tsv.read_rows(tmp_path / "lora")
    result = evaluate_json(capsys, ["--load_model", str(base), "--lora_load", str(tmp_path / "lora" / "rwkv-final.pth"),
                                    "--data_file", str(held_out), "--ctx_len", "16", "--micro_bsz", "2",
                                    "--vocab_file", str(finished_run / "vocab.json"), "--max_tokens", "801"])
    assert f"{result['loss']:.8f}" == f"{row['loss']:.8f}" and row["tokens"] == result["tokens"] == 50 * 16


def test_evaluates_after_every_nth_mini_epoch_and_the_last():
    def evaluated(*flags):
        cfg = parse_args(["--data_type", "dummy", "--valid_data_file", "held_out.txt", *flags])
        return [epoch for epoch in range(run_epochs(RunFiles.from_flags(cfg))) if evaluates_after(epoch, cfg)]

    assert evaluated("--epoch_count", "10", "--valid_every", "3") == [2, 5, 8, 9]
    assert evaluated("--epoch_count", "10") == list(range(10))
    # a run continued at mini-epoch 4 keeps the rhythm of the whole training (real epochs 5 and 8), and its last
    assert evaluated("--epoch_count", "10", "--epoch_begin", "4", "--valid_every", "3") == [1, 4, 5]
    assert evaluated("--epoch_count", "10", "--valid_every", "4", "--max_epochs", "2") == [1]


def test_held_out_flags_may_change_on_resume():
    cfg = parse_args(["--data_type", "dummy", "--valid_data_file", "held_out.txt", "--valid_every", "2"])
    assert not {"valid_data_file", "valid_data_type", "valid_every", "valid_tokens"} & shaping_flags(cfg).keys()


@pytest.mark.parametrize("flags, words", [
    (["--valid_every", "2"], ["--valid_every applies to --valid_data_file"]),
    (["--valid_data_file", "{f}", "--valid_every", "0"], ["--valid_every 0 must be in [1, 2147483647]"]),
    (["--valid_data_file", "{f}", "--valid_data_type", "numpy"], ["character-level text", "token ids"]),
    (["--valid_data_file", "{f}", "--valid_data_type", "jsonl"], ["character-level text"]),
    (["--valid_data_file", "{f}", "--strategy", "deepspeed_stage_3"], ["ZeRO-3"]),
    (["--valid_data_file", "{f}", "--valid_data_type", "utf-8", "--my_script_mask", "0_2", "--valid_tokens", "-1"],
     ["--valid_tokens -1 must be at least 0"]),
    (["--valid_data_file", "{f}.missing", "--valid_data_type", "utf-8"], ["--valid_data_file", "file not found"]),
    (["--valid_data_file", "{f}", "--valid_data_type", "utf-8", "--ctx_len", "4000"],
     ["give no window of --ctx_len 4000"]),
])
def test_held_out_refusals_are_one_line_and_write_nothing(validated_run, tmp_path, capsys, flags, words):
    _, held_out, _ = validated_run
    argv = [*TINY_RUN, "--proj_dir", str(tmp_path / "out"), *(f.replace("{f}", str(held_out)) for f in flags)]
    refused_in_one_line(argv, capsys, *words)
    assert folder_snapshot(tmp_path / "out") == {}


@pytest.mark.parametrize("flags, words", [
    (["--data_type", "numpy", "--data_file", "x.npy", "--vocab_size", "9", "--valid_data_file", "v",
      "--valid_data_type", "jsonl"], ["--valid_data_type jsonl needs --vocab_file"]),
    (["--data_type", "numpy", "--data_file", "x.npy", "--vocab_size", "9", "--valid_data_file", "v",
      "--valid_data_type", "uint16"], ["--valid_data_type uint16 needs --my_sample_len"]),
    (["--data_type", "jsonl", "--data_file", "x.jsonl", "--vocab_file", "t.json", "--select_name", "A",
      "--valid_data_file", "v", "--valid_data_type", "binidx"], ["--select_name masks jsonl documents"]),
    (["--data_type", "binidx", "--data_file", "x", "--vocab_size", "9", "--my_script_mask", "1_0",
      "--valid_data_file", "v", "--valid_data_type", "numpy"], ["cannot mask the held-out data"]),
])
def test_held_out_data_must_fit_the_training_flags(flags, words):
    from src.errors import UserInputError

    with pytest.raises(UserInputError) as refusal:
        parse_args(flags)
    assert all(text in str(refusal.value) for text in words), str(refusal.value)


def test_jsonl_held_out_data_may_bring_its_tokenizer():
    cfg = parse_args(["--data_type", "numpy", "--data_file", "x.npy", "--vocab_size", "9", "--valid_data_file",
                      "v.jsonl", "--valid_data_type", "jsonl", "--vocab_file", "20B_tokenizer.json"])
    assert cfg.valid_data_type == "jsonl"
    assert parse_args(["--data_type", "dummy", "--valid_data_file", "v.txt"]).valid_data_type == "utf-8"
