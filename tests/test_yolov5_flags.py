"""YOLOv5 flags each script accepts without acting on them: parsed, warned about, or refused in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import detect
import export
import train_distill
import val
from engine import options
from engine.yolov5_flags import GROUP_TITLE, Yolov5OnlyFlag, check_yolov5_only_flags, check_yolov5_only_kwargs

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"val": ["--weights", "w.pt", "--data", "d.yaml"], "detect": ["--weights", "w.pt", "--source", "s"],
            "export": ["--weights", "w.pt"], "train": []}
SCRIPTS = {"val": (val.parse_opt, val.YOLOV5_ONLY_FLAGS), "detect": (detect.parse_opt, detect.YOLOV5_ONLY_FLAGS),
           "export": (export.parse_opt, export.YOLOV5_ONLY_FLAGS),
           "train": (train_distill.parse_options, options.YOLOV5_ONLY_FLAGS)}


def _setting(flag: Yolov5OnlyFlag) -> list[str]:
    """A command-line setting of ``flag`` that differs from its default."""
    if flag.options.get("action") == "store_true" or flag.options.get("nargs") == "?":
        return [flag.names[0]]
    kind = flag.options.get("type", str)
    return [flag.names[0], {int: "7", float: "0.7"}.get(kind, "x")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_parses_and_is_refused_or_named(script: str, caplog: pytest.LogCaptureFixture) -> None:
    parse, flags = SCRIPTS[script]
    assert flags
    for flag in flags:
        opt = parse(REQUIRED[script] + _setting(flag))
        assert getattr(opt, flag.dest) != flag.default
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            if flag.refused:
                with pytest.raises(ValueError, match=f"^{flag.names[0]}: "):
                    check_yolov5_only_flags(opt, flags)
            else:
                assert check_yolov5_only_flags(opt, flags) == ([] if flag.quiet else [flag.names[0]])
                assert (flag.names[0] in caplog.text) != flag.quiet
    assert not check_yolov5_only_flags(parse(REQUIRED[script]), flags)  # nothing set: nothing said


@pytest.mark.parametrize("script", ["val", "detect", "export"])
def test_help_lists_them_in_their_own_group(script: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        SCRIPTS[script][0](["--help"])
    text = capsys.readouterr().out
    assert GROUP_TITLE in text and text.index(GROUP_TITLE) > text.index("--weights")


def test_refused_flag_is_one_line_with_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        val.main(["--weights", "w.pt", "--data", "d.yaml", "--augment"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["val.py: error: --augment: YOLOv5's test-time augmentation is not part of this tool; "
                   "validate without it"]


def test_an_ignored_flag_leaves_the_run_as_it_was(tmp_path: Path) -> None:
    image = REPO / "tests" / "fixtures" / "oracle_val_odd" / "images" / "val" / "000001.png"
    runs = []
    for extra in ([], ["--dnn", "--data", "whatever.yaml", "--update"]):
        argv = ["--weights", str(REPO / "weights" / "demo_teacher.pt"), "--source", str(image), "--imgsz", "160",
                "--nosave", "--save-txt", "--project", str(tmp_path), "--device", "cpu", *extra]
        assert detect.main(argv) == 0
        runs.append(sorted(tmp_path.glob("exp*/labels/*.txt"))[-1].read_text())
    assert runs[0] == runs[1] and runs[0]


def test_run_from_python_takes_yolov5s_keywords_and_no_others(tmp_path: Path) -> None:
    image = REPO / "tests" / "fixtures" / "oracle_val_odd" / "images" / "val" / "000001.png"
    kw = dict(imgsz=160, device="cpu", nosave=True, project=tmp_path, verbose=False)
    out = detect.run(REPO / "weights" / "demo_teacher.pt", image, dnn=True, **kw)  # as YOLOv5's detect.run takes it
    assert len(out.results) == 1
    with pytest.raises(ValueError, match="^--augment: "):
        detect.run(REPO / "weights" / "demo_teacher.pt", image, augment=True, **kw)
    with pytest.raises(TypeError, match="val.run\\(\\) got unexpected keyword argument\\(s\\) 'no_such_flag'"):
        check_yolov5_only_kwargs({"no_such_flag": 1, "dnn": True}, val.YOLOV5_ONLY_FLAGS, "val.run")


@pytest.mark.parametrize("script", ["val", "detect"])
def test_run_takes_the_parsed_command_line_whole(script: str) -> None:
    """``run(**vars(parse_opt(argv)))`` is the whole CLI: every parsed name is one of run()'s keywords."""
    import inspect

    module = {"val": val, "detect": detect}[script]
    opt = vars(SCRIPTS[script][0](REQUIRED[script] + (["--noplots"] if script == "val" else [])))
    params = inspect.signature(module.run).parameters
    yolov5_only = {f.dest for f in SCRIPTS[script][1]}
    assert set(opt) - yolov5_only <= set(params)
    if script == "val":
        assert opt["plots"] is False


def test_yolov5_only_flag_defaults() -> None:
    assert Yolov5OnlyFlag(("--x",), "why").default is False
    assert Yolov5OnlyFlag(("--top-k",), "why", {"type": int, "default": 100}).dest == "top_k"
