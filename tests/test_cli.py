"""What every command line shares (src/cli.py): --help exits 0; a usage error is one line and exit code 2."""
import re

import pytest

import evaluate
import export_hf
import import_hf
import merge_lora
import merge_lora_plus
import plot_run
import preprocess_data
import train

CLIS = {"train.py": train, "merge_lora.py": merge_lora, "merge_lora_plus.py": merge_lora_plus,
        "preprocess_data.py": preprocess_data, "export_hf.py": export_hf, "import_hf.py": import_hf,
        "evaluate.py": evaluate, "plot_run.py": plot_run}


@pytest.mark.parametrize("prog", CLIS)
def test_help_exits_0(prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        CLIS[prog].main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


@pytest.mark.parametrize("prog", CLIS)
def test_a_usage_error_is_one_line_and_exit_2(prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        CLIS[prog].main(["--no_such_flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"{re.escape(prog)}: error: .+ \(see {re.escape(prog)} --help\)\n", err), err


def test_preprocess_data_names_a_bad_choice(capsys):
    with pytest.raises(SystemExit) as exit_info:
        preprocess_data.main(["--input", "x.jsonl", "--output-prefix", "out", "--tokenizer-type", "SPMTokenizer"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'SPMTokenizer'" in err and err.count("\n") == 1
