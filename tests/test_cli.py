"""Every script answers argparse's own errors (unknown flag, missing or mistyped value) with one
line on stderr and exit 2, like its other bad input: cli.Parser, not argparse's usage block.
files.written_whole leaves a file whole: new, or as it was; files.holding lets one process at a
time hold a folder."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lab import ablation
import cli
import compare
import files
from lab import frontier
import mask
from lab import probe
import sample
from lab import sweep
import train
from corpus.prepare import main as prepare_main

SCRIPTS = {"train.py": train.main, "sample.py": sample.main, "compare.py": compare.main,
           "lab/sweep.py": sweep.main, "lab/frontier.py": frontier.main, "lab/ablation.py": ablation.main,
           "mask.py": mask.main,
           "corpus/prepare.py": prepare_main, "lab/probe.py": probe.main}
BAD = {"train.py": ["--max_iters", "many"], "sample.py": ["--max_new_tokens"],
       "compare.py": ["--repeats", "x"], "lab/sweep.py": ["--seeds", "x"],
       "lab/frontier.py": ["--seeds", "x"], "lab/ablation.py": ["--seeds", "x"], "mask.py": ["--T", "1.5"],
       "corpus/prepare.py": ["--tokenizer"], "lab/probe.py": ["--vocab", "x"]}


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
    with pytest.raises(cli.CannotWrite, match="disk full.*the previous version is kept"):
        with files.written_whole(path) as tmp:
            open(tmp, "w").write("half")
            raise OSError("disk full")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with files.written_whole(path) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    path = tmp_path / "ckpt.pt"
    with files.written_whole(path) as a, files.written_whole(path) as b:
        assert a != b
        open(a, "w").write("a")
        open(b, "w").write("b")
    assert path.read_text() == "a"  # the outer block ends last: its file is the one that stays


def test_a_held_folder_is_refused_to_another_process_and_freed_by_its_death(tmp_path):
    """The lock is the kernel's: held while the holder lives, free once it is gone, whatever
    the way it went (here a kill -9)."""
    holder = subprocess.Popen([sys.executable, "-c", "import files, time, sys\n"
                               f"with files.holding({str(tmp_path)!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(cli.BadInput, match=f"in use by another run \\(process {holder.pid}\\)"):
            with files.holding(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with files.holding(tmp_path):  # a stale lock file is not a lock
        pass
