"""Every script answers argparse's own errors (unknown flag, missing or mistyped value) with one
line on stderr and exit 2, like its other bad input: cli.Parser, not argparse's usage block.
files.written_whole leaves a file whole: new, or as it was, and on the disk before and after the
rename; files.holding lets one process at a time hold a folder, and only its holder removes the
leftovers of killed writers."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab import ablation
import cli
import compare
import config as cfg
from lab import experiment
import files
from lab import frontier
import mask
from lab import probe
import sample
from lab import sweep
import train
from corpus.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[1]

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


WRITERS = {"checkpoint": lambda path: cfg.save_checkpoint(path, {"w": torch.ones(3)}),
           "results": lambda path: experiment.write_json({"loss": 2.0}, path)}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_written_file_reaches_the_disk_before_its_name_and_the_rename_after(writer, tmp_path,
                                                                              monkeypatch):
    """A power cut cannot be staged in a test; what makes a write survive one can be seen: the
    file's bytes are flushed (fsync) before the rename, or the new name may reach the disk before
    them and a cut leave ckpt.pt empty; the folder is flushed after the rename, or the rename
    itself may be lost. The order of the calls, recorded as they happen."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst, **kw):
        calls.append(("rename", str(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "written"
    WRITERS[writer](path)
    the_file, the_folder = ("fsync", path.stat().st_ino), ("fsync", tmp_path.stat().st_ino)
    renamed = calls.index(("rename", str(path)))
    assert the_file in calls[:renamed], calls
    assert the_folder in calls[renamed + 1:], calls


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


def test_a_refused_process_leaves_the_holders_temporary_files_alone(tmp_path):
    """A live run is writing its checkpoint under a temporary name when a second run asks for
    the folder: the second is refused, and the file the live run is writing is still there
    (leftovers are removed only by the folder's holder: nobody else can be writing them then)."""
    with files.holding(tmp_path), files.written_whole(tmp_path / "ckpt.pt") as tmp:
        Path(tmp).write_text("half a checkpoint")
        with pytest.raises(cli.BadInput, match="in use by another run"):
            with files.holding(tmp_path):
                pass
        assert Path(tmp).exists() and Path(tmp).read_text() == "half a checkpoint"
    assert (tmp_path / "ckpt.pt").read_text() == "half a checkpoint"


# -----------------------------------------------------------------------------
# the same bad paths and files, walked over every entry point


WRITES = {  # entry point: (the flag naming where it writes, and the other flags it needs)
    "train.py": ("--out_dir", []), "compare.py": ("--out_dir", []),
    "lab/sweep.py": ("--out_dir", []), "lab/frontier.py": ("--out_dir", []),
    "lab/probe.py": ("--out_dir", ["--mqar"]), "lab/ablation.py": ("--out_dir", []),
    "corpus/prepare.py": ("--data_root", []), "sample.py": ("--out_dir", []),
    "mask.py": ("--png", [])}


def unwritable_folder():
    """A folder nothing can be created in, for any user (a read-only mount would do); None if
    this machine has none that the test can find."""
    path = Path("/sys/nanobdd_test")
    try:
        path.mkdir()
    except OSError:
        return path
    path.rmdir()
    return None


def bad_folder(kind, tmp_path):
    """A folder an entry point cannot write: a file, a folder under a file, a name too long
    for the file system, or one nothing can be created in."""
    (tmp_path / "afile").write_text("not a folder")
    return {"a file": tmp_path / "afile", "under a file": tmp_path / "afile" / "run",
            "too long": tmp_path / ("x" * 300), "unwritable": unwritable_folder()}[kind]


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


@pytest.mark.parametrize("kind", ["a file", "under a file", "too long", "unwritable"])
@pytest.mark.parametrize("script", WRITES)
def test_every_entry_point_refuses_a_folder_it_cannot_write_in_one_line(script, kind, tmp_path,
                                                                        capsys, monkeypatch):
    """FileExistsError, NotADirectoryError and OSError tracebacks from the experiments (and
    ENAMETOOLONG from all) became one line: exit 2 for a bad flag, 3 for a folder that cannot
    be written, and nothing written."""
    folder = bad_folder(kind, tmp_path)
    if folder is None:
        pytest.skip("no folder here refuses every user")
    flag, extra = WRITES[script]
    where = str(folder / "mask.png") if flag == "--png" else str(folder)
    with pytest.raises(SystemExit) as e:
        call(script, [flag, where, *extra], monkeypatch)
    assert e.value.code in (2, 3)
    one_error_line(capsys)
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


LR_JSON = {  # a hand-edited or damaged lr.json, and what the line must say
    "garbage": ("{not json", "lr.json is not JSON"),
    "empty object": ("{}", "has no field 'chosen'"),
    "string rate": ('{"chosen": {"dec": "1e-3"}, "recipe": {}}',
                    'the field chosen["dec"] is a JSON string, not a number'),
    "no recipe": ('{"chosen": {"dec": 1e-3}}', "has no field 'recipe'"),
    "boolean rate": ('{"chosen": {"dec": true}, "recipe": {}}',  # trained dec at rate 1.0
                     'the field chosen["dec"] is a JSON boolean, not a number'),
    "a folder": (None, "lr.json is a folder; give the path of the lr.json file"),
}


@pytest.mark.parametrize("damage", LR_JSON)
@pytest.mark.parametrize("script", ["lab/frontier.py", "lab/sweep.py"])
def test_a_damaged_lr_json_is_one_line_naming_the_file_and_field(script, damage, tmp_path,
                                                                 capsys, monkeypatch):
    """TypeError, KeyError or a silent rate of 1.0 before; checked by shape as it is read, and
    before anything trains (a folder was found only after every run had trained)."""
    content, message = LR_JSON[damage]
    path = tmp_path / "lr.json"
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(SystemExit) as e:
        call(script, ["--lr", "auto", "--lr_file", str(path), "--out_dir",
                      str(tmp_path / "out")], monkeypatch)
    assert e.value.code == 2 and message in one_error_line(capsys)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*/ckpt.pt"))


READ_BACK = {  # an experiment's own file, damaged: (the command, the file, content, message)
    "diverged.json garbage": (["lab/frontier.py", "--archs", "dec", "--lr", "dec=1e-3",
                               "--seeds", "1"], "dec_s1337/diverged.json", "garbage",
                              "diverged.json is not JSON"),
    "diverged.json empty": (["lab/frontier.py", "--archs", "dec", "--lr", "dec=1e-3",
                             "--seeds", "1"], "dec_s1337/diverged.json", "{}",
                            "diverged.json: the document has no field 'train_config'"),
    "probes.json shape": (["lab/probe.py", "--copy", "nowhere"], "probes.json",
                          '{"copy": {"samples": 64, "checkpoints": {}}}',
                          'the field copy["checkpoints"] is a JSON object, not an array'),
    "sweep.json shape": (["lab/sweep.py", "--sizes", "xs"], "sweep.json", "[]",
                         "sweep.json: the document is a JSON array, not an object"),
}


@pytest.mark.parametrize("case", READ_BACK)
def test_an_experiment_file_damaged_by_hand_is_one_line(case, tmp_path, capsys, monkeypatch):
    (script, *argv), name, content, message = READ_BACK[case]
    (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / name).write_text(content)
    with pytest.raises(SystemExit) as e:
        call(script, [*argv, "--out_dir", str(tmp_path / "out")], monkeypatch)
    assert e.value.code == 2 and message in one_error_line(capsys)


def test_a_reader_that_stops_reading_ends_the_output_quietly():
    """`python mask.py | head` raised BrokenPipeError."""
    run = subprocess.Popen([sys.executable, "mask.py", "--T", "256"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.read(100)
    run.stdout.close()  # as head does once it has its lines
    err = run.stderr.read().decode()
    assert run.wait() == 141 and err == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_each_default_once(script, monkeypatch, capsys):
    """"(default: Shakespeare) (default None)": a help that says its default in words got the
    field's default appended again."""
    with pytest.raises(SystemExit):
        call(script, ["--help"], monkeypatch)
    entries = capsys.readouterr().out.split("\n  -")
    assert all(entry.count("(default") <= 1 for entry in entries), \
        [entry for entry in entries if entry.count("(default") > 1]


def test_the_gpu_check_without_a_gpu_is_one_line():
    """bench/gpu_check.sh ended in an AssertionError traceback on a machine without CUDA."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True,
                         text=True)
    assert run.returncode != 0 and run.stdout == "" and "Traceback" not in run.stderr
    assert "no CUDA GPU" in run.stderr and run.stderr.count("\n") == 1


@pytest.mark.parametrize("script", ["train.py", "compare.py", "corpus/prepare.py"])
def test_a_data_path_too_long_for_the_file_system_is_one_line(script, tmp_path, capsys,
                                                              monkeypatch):
    """--data of a 300-character file name raised OSError (ENAMETOOLONG) from a path check."""
    data = tmp_path / ("x" * 300 + ".txt")
    with pytest.raises(SystemExit) as e:
        call(script, ["--data", str(data), *([] if script == "corpus/prepare.py" else
                                             ["--out_dir", str(tmp_path / "out")])], monkeypatch)
    assert e.value.code == 2 and "a name in it is 304 bytes long" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
