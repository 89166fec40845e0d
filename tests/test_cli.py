"""Every script answers argparse's own errors (unknown flag, missing or mistyped value) with one
line on stderr and exit 2, like its other bad input: cli.Parser, not argparse's usage block.
And cli.written_whole leaves a file whole: new, or as it was."""

import sys

import pytest

import cli
import compare
import corpus
import mask
import sample
import train

SCRIPTS = {"train.py": train.main, "sample.py": sample.main, "compare.py": compare.main,
           "mask.py": mask.main, "corpus.py": corpus.main}
BAD = {"train.py": ["--max_iters", "many"], "sample.py": ["--max_new_tokens"],
       "compare.py": ["--repeats", "x"], "mask.py": ["--T", "1.5"], "corpus.py": ["--tokenizer"]}


def call(script, argv, monkeypatch):
    """The script's main(argv), with sys.argv set as on its command line."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    return SCRIPTS[script](argv)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kind", ["unknown flag", "bad value"])
def test_argparse_errors_are_one_line(script, kind, monkeypatch, capsys):
    argv = ["--no_such_flag"] if kind == "unknown flag" else BAD[script]
    with pytest.raises(SystemExit) as e:
        call(script, argv, monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and err.rstrip().endswith("--help)"), err


def test_written_whole_replaces_or_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(OSError):
        with cli.written_whole(path) as tmp:
            open(tmp, "w").write("half")
            raise OSError("disk full")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with cli.written_whole(path) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
