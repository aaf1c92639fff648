"""The demo and the evaluation as a new user meets them: earlier output kept, Ctrl-C, missing optional packages."""

import os

import pytest

from arrag.cli import main
from arrag.extras import PACKAGES, extra
from arrag.outputs import fresh_run_folder
from cli_process import ctrl_c, without

EVAL_MODULES = extra("eval")


def test_run_folders_are_numbered_after_the_highest_and_never_reused(tmp_path):
    assert fresh_run_folder(tmp_path / "runs") == tmp_path / "runs" / "run-0001"
    (tmp_path / "runs" / "run-0007").mkdir()
    (tmp_path / "runs" / "run-0002.txt").write_text("not a run")
    assert fresh_run_folder(tmp_path / "runs") == tmp_path / "runs" / "run-0008"
    assert fresh_run_folder(tmp_path / "runs") == tmp_path / "runs" / "run-0009"


@pytest.mark.parametrize(("argv", "earlier"), [(["demo"], "summary.json"), (["eval", "--quick"], "results.json")])
def test_an_out_holding_an_earlier_run_is_refused_before_any_work(argv, earlier, tmp_path, capsys):
    (tmp_path / earlier).write_text("{}")
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"arrag: error: {tmp_path} holds an earlier run's output; pass --overwrite to replace it, or write to another "
        "folder (--out DIR)\n"
    )
    assert main([*argv, "--out", str(tmp_path / earlier)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_ctrl_c_during_the_demo_says_that_nothing_was_written(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    argv = ["demo", "--out", str(out), "--cache", str(cache), "--prompts", "1", "--num-images", "1"]
    code, err = ctrl_c(argv, lambda _: cache.exists())  # while it builds the world database
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "arrag: interrupted: nothing was written: the demo writes its grid and summary when it is done"
    )
    assert not out.exists()


def test_ctrl_c_during_the_evaluation_says_that_nothing_was_written(tmp_path):
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = ["eval", "--quick", "--out", str(tmp_path / "eval")]
    code, err = ctrl_c(argv, lambda err: "database images:" in err, environment)  # at its first step
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "arrag: interrupted: nothing was written: the report is written when the evaluation is done"
    )
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("module", EVAL_MODULES)
def test_the_evaluation_names_a_missing_package_and_its_extra_before_any_work(module, tmp_path):
    result = without([module], ["eval", "--quick", "--out", str(tmp_path / "eval")])
    assert result.returncode == 2
    [line] = result.stderr.splitlines()  # (torchmetrics does not import without matplotlib either)
    assert line.startswith(f"arrag: error: the evaluation needs {PACKAGES[module][0]}")
    assert line.endswith(': pip install "arrag[eval]"')
    assert not (tmp_path / "eval").exists()


def test_the_other_commands_work_without_the_eval_extra(tmp_path):
    result = without(EVAL_MODULES, ["generate", "a red 7", "--backend", "tiny", "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
