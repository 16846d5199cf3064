"""tools/rehearse.py at tiny scale, both paths: every stage's real command line, torchrun and the
SIGKILLs included, ends in the stage table; and the tree-kill helper leaves no process behind."""
import os
import subprocess
import sys

import pytest

from tools import rehearse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_rehearsal_runs_every_stage(tmp_path):
    argv = [sys.executable, "-m", "tools.rehearse", "--scale", "tiny",
            "--out", str(tmp_path / "work")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("\nstage "):]
    rows = [line.split()[0] for line in table.strip().splitlines()[1:]]
    assert set(rows) == {stage for stage, _ in rehearse.STAGES} | {"total"}
    assert "SIGKILL of 3 processes" in table          # the launcher and its 2 workers
    assert "positions whose tokens differ between ONNX Runtime and PyTorch" in done.stdout
    assert not (tmp_path / "work").exists()            # removed without --keep


@pytest.mark.slow
def test_tiny_training_rehearsal_runs_every_stage(tmp_path):
    argv = [sys.executable, "-m", "tools.rehearse", "--path", "train", "--scale", "tiny",
            "--out", str(tmp_path / "work")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("\nstage "):]
    rows = [line.split()[0] for line in table.strip().splitlines()[1:]]
    assert set(rows) == {stage for stage, _ in rehearse.TRAIN_STAGES} | {"total"}
    assert "images/s" in table                          # the resumed cache build's encode rate
    assert "SIGKILL of 1 process after step" in table   # train.py alone
    assert "SIGKILL of 3 processes after step" in table  # torchrun and its 2 ranks
    assert table.count("bit for bit") == 2              # 1 process and DDP, both resumed
    assert not (tmp_path / "work").exists()


def test_kill_tree_kills_processes_in_other_sessions():
    # a launcher whose children leave its session, as torchrun's workers do
    code = ("import subprocess, time\n"
            "for _ in range(2): subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
            "print('started', flush=True); time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline() == "started\n"
    tree, peak = rehearse.kill_tree(launcher.pid)
    launcher.wait()
    assert len(tree) == 3 and peak > 0
    assert rehearse.wait_gone(tree - {launcher.pid}) == []


def test_a_failing_stage_ends_with_its_stderr_and_one_error_line(tmp_path, monkeypatch, capsys):
    def failing(r):
        r.run("sample", "a command that fails",
              [sys.executable, "-c", "import sys; sys.exit('boom')"])
    monkeypatch.setattr(rehearse, "STAGES", [("sample", failing)])
    with pytest.raises(ValueError, match=r"^sample: a command that fails exited with status 1$"):
        args = ["--scale", "tiny", "--out", str(tmp_path / "w")]
        rehearse.main(rehearse.get_parser().parse_args(args))
    assert "boom" in capsys.readouterr().err
