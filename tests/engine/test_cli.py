"""The `maskrcnn` command end to end on tiny data, and its usage errors."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.checkpoint import latest_checkpoint, load_checkpoint
from engine.cli import build_parser, main

PACKAGE_DIR = Path(__file__).resolve().parents[2]   # the repository root

TINY_SETS = ["backbone=resnet18", "norm=gn", "fpn_channels=32", "representation_size=64",
             "mask_layers=32,", "mask_dim_reduced=32", "min_size=64", "train_min_size=64,",
             "max_size=64", "anchor_sizes=8,16,32,64,128", "rpn_pre_nms_top_n_train=200",
             "rpn_post_nms_top_n_train=50", "rpn_pre_nms_top_n_test=100",
             "rpn_post_nms_top_n_test=50", "box_batch_size_per_image=32",
             "box_detections_per_img=20", "num_workers=0", "batch_size=2"]


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory):
    """`maskrcnn train` with a config file plus --set: (config path, output dir)."""
    root = tmp_path_factory.mktemp("cli")
    (tj, ti), (vj, vi) = shapes_data["train"], shapes_data["val"]
    config = root / "tiny.ini"
    config.write_text(
        "[model]\nnum_classes = 3\n[backbone]\nbackbone = resnet18\nnorm = gn\n"
        f"[data]\ntrain_json = {tj}\ntrain_images = {ti}\nval_json = none\n"
        f"val_images = {vi}\n[solver]\nmax_iter = 100\nwarmup_iters = 0\nlr = 0.01\n"
        f"output_dir = {root / 'out'}\nlog_every = 1\n")
    code = main(["train", "--config", str(config), "--no-progress",
                 "--set", "solver.max_iter=2", *TINY_SETS])
    assert code == 0
    return config, root / "out"


def test_train_writes_checkpoint_log_and_plot(trained):
    _, out = trained
    state = load_checkpoint(latest_checkpoint(out))
    assert state["iteration"] == 2                        # --set beat the file's 100
    assert state["config"]["backbone"]["fpn_channels"] == 32
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert (out / "loss.png").is_file()
    # --resume with a larger max_iter continues from 2
    config, _ = trained
    assert main(["train", "--config", str(config), "--no-progress", "--resume",
                 "--set", "max_iter=3", *TINY_SETS]) == 0
    assert load_checkpoint(latest_checkpoint(out))["iteration"] == 3


def test_eval_matches_pycocotools_on_its_results_file(trained, shapes_data, tmp_path):
    _, out = trained
    vj, vi = shapes_data["val"]
    code = main(["eval", "--weights", str(latest_checkpoint(out)), "--data", str(vj),
                 "--images", str(vi), "--results", str(tmp_path / "r.json"),
                 "--metrics", str(tmp_path / "m.json"), "--no-progress", "--loss",
                 "--set", "box_score_thresh=0.0"])
    assert code == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    results = json.loads((tmp_path / "r.json").read_text())
    assert results and set(metrics["per_category"]) == {"circle", "square", "triangle"}
    assert len(metrics["loss"]) == 5
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(vj))
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(gt, gt.loadRes(str(tmp_path / "r.json")), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert metrics[iou_type]["AP"] == pytest.approx(ev.stats[0], abs=1e-9)
            assert metrics[iou_type]["AP50"] == pytest.approx(ev.stats[1], abs=1e-9)


def test_eval_skips_unreadable_images_and_reports_per_category(trained, bad_images_data,
                                                               tmp_path, capsys):
    json_path, image_dir, bad = bad_images_data
    argv = ["eval", "--weights", str(latest_checkpoint(trained[1])), "--data",
            str(json_path), "--images", str(image_dir), "--no-progress", "--batch-size", "3"]
    capsys.readouterr()
    assert main(argv + ["--metrics", str(tmp_path / "m.json"),
                        "--set", "box_score_thresh=0.0", "box_detections_per_img=5"]) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "warning" in line and "1.jpg" in line]
    assert ("skipped 4 of 8 images: 1.jpg (truncated), 2.png (not an image), 3.png (empty "
            "file), 4.png (missing); AP covers the other 4") in out
    assert "bbox AP" in out and "segm AP" in out and "instances" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {s["file"]: s["reason"] for s in metrics["skipped"]} == bad
    assert set(metrics["per_category"]) == {"circle", "square", "triangle"}
    assert all(set(row) == {"bbox", "segm", "instances"}
               for row in metrics["per_category"].values())
    for name in ("pr_bbox", "pr_segm", "pr_bbox_per_category", "pr_segm_per_category"):
        assert (tmp_path / f"{name}.png").is_file(), name      # beside --metrics
    # --on-error raise: one line naming the first bad file, exit code 1
    assert main(argv + ["--on-error", "raise"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("maskrcnn eval: error: image file ") and "1.jpg" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_eval_outputs_that_cannot_be_created_are_one_line_errors(trained, shapes_data,
                                                                  tmp_path, capsys):
    vj, vi = shapes_data["val"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["eval", "--weights", str(latest_checkpoint(trained[1])), "--data", str(vj),
            "--images", str(vi), "--no-progress"]
    capsys.readouterr()
    for option, path in (("--metrics", blocker / "m.json"), ("--plots", blocker / "plots"),
                         ("--results", blocker / "sub" / "r.json"), ("--plots", blocker),
                         ("--metrics", tmp_path)):
        assert main(argv + [option, str(path)]) == 2, option
        err = capsys.readouterr().err
        assert err.startswith(f"maskrcnn eval: error: {option} {path}: "), err
        assert len(err.strip().splitlines()) == 1
    err = _usage_error(capsys, ["eval", "--weights", str(vj), "--data", str(vj),
                                "--images", str(vi)])
    assert f"--weights {vj}" in err and "not a checkpoint" in err
    assert "missing.json" in _usage_error(capsys, ["eval", "--weights", str(vj), "--data",
                                                   str(tmp_path / "missing.json"),
                                                   "--images", str(vi)])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write into a read-only folder")
def test_eval_output_in_a_read_only_folder_is_a_one_line_error(trained, shapes_data,
                                                                tmp_path, capsys):
    vj, vi = shapes_data["val"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["eval", "--weights", str(latest_checkpoint(trained[1])), "--data",
                     str(vj), "--images", str(vi), "--metrics",
                     str(locked / "sub" / "m.json")]) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert f"no permission to write in {locked}" in err and len(err.splitlines()) == 1


def test_predict_command(trained, shapes_data, tmp_path, capsys):
    _, out = trained
    vi = shapes_data["val"][1]
    assert main(["predict", "--weights", str(latest_checkpoint(out)), str(vi),
                 "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert len(list((tmp_path / "p").glob("*.png"))) == len(list(vi.glob("*.png")))
    assert isinstance(json.loads((tmp_path / "p" / "results.json").read_text()), list)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, fake_clock):
    out = tmp_path / "demo"
    minutes = 0.2
    clock = fake_clock(1.0)      # each training step 1 s of a fake clock: 12 steps in 0.2 min
    code = main(["demo", "--out", str(out), "--minutes", str(minutes), "--no-progress",
                 "--set", "demo.demo_num_train=8", "demo.demo_num_val=3",
                 "demo.demo_image_size=64", "demo.demo_num_classes=3", "log_every=1",
                 *TINY_SETS])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}
    assert all(0.0 <= metrics[t]["AP"] <= 1.0 for t in metrics)
    assert len(list((out / "overlays").glob("*.png"))) == 3
    assert (out / "loss.png").is_file() and (out / "val.json").is_file()
    assert len(json.loads((out / "val.json").read_text())["images"]) == 3
    state = load_checkpoint(latest_checkpoint(out))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [0.0] + [r["time"] for r in records if "time" in r]
    longest = max(b - a for a, b in zip(steps, steps[1:]))
    assert len(steps) - 1 == state["iteration"] >= 1
    # training stops at the first iteration end past the budget (evaluation excluded):
    # on the fake clock exactly budget / step iterations, and the budget to the bit
    assert state["iteration"] == round(minutes * 60 / clock.step_s) == 12
    assert state["elapsed_s"] == minutes * 60
    assert minutes * 60 <= state["elapsed_s"] <= minutes * 60 + longest + 1.0
    assert any("eval" in r for r in records)
    text = capsys.readouterr().out
    assert "segm AP / AP50" in text and "evaluation" in text and "target" in text


@pytest.mark.slow
def test_demo_default_is_fixed_iterations_and_seeded(tmp_path, capsys):
    """By default the demo trains demo.demo_iters iterations from a seed: a run next to a
    CPU-bound process (another job on a shared machine) ends at the same iteration with the
    same weights and the same AP as a run alone."""
    argv = ["demo", "--no-progress", "--set", "demo.demo_iters=5", "demo.demo_num_train=8",
            "demo.demo_num_val=3", "demo.demo_image_size=64", *TINY_SETS]
    assert main([*argv, "--out", str(tmp_path / "alone")]) == 0
    assert "training 5 iterations (expected: about" in capsys.readouterr().out
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert main([*argv, "--out", str(tmp_path / "loaded")]) == 0
        assert hog.poll() is None, "the CPU-bound process ran through the second run"
    finally:
        hog.kill()
        hog.wait()
    alone, loaded = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("alone", "loaded"))
    assert alone["iteration"] == loaded["iteration"] == 5
    assert alone["model"].keys() == loaded["model"].keys()
    for k, v in alone["model"].items():
        assert torch.equal(v, loaded["model"][k]), k
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("alone", "loaded")]
    assert metrics[0] == metrics[1]


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: maskrcnn {argv[0]}" in err or "invalid choice" in err   # which command
    return err


def _one_line_error(capsys, argv, code):
    """A failure found while running: exit status `code`, one stderr line naming the
    command (engine.cli.CliError), no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(f"maskrcnn {argv[0]}: error: ") and len(err.splitlines()) == 1, err
    return err


def test_bad_arguments_are_usage_errors(trained, tmp_path, capsys):
    config, out = trained
    weights = str(latest_checkpoint(out))
    assert "missing.ini" in _usage_error(capsys, ["train", "--config",
                                                  str(tmp_path / "missing.ini")])
    err = _usage_error(capsys, ["train", "--config", str(config), "--set", "solver.nope=1"])
    assert "solver.nope" in err
    err = _usage_error(capsys, ["train", "--config", str(config), "--set", "max_iter=abc"])
    assert "max_iter" in err and "int" in err
    assert "SECTION.KEY=VALUE" in _usage_error(
        capsys, ["train", "--config", str(config), "--set", "max_iter"])
    bad = tmp_path / "bad.ini"
    bad.write_text("[solver]\nlr = fast\n")
    err = _usage_error(capsys, ["train", "--config", str(bad)])
    assert "bad.ini" in err and "lr" in err and "float" in err
    assert "nope.pth" in _usage_error(capsys, ["eval", "--weights", str(tmp_path / "nope.pth"),
                                               "--data", "x.json", "--images", "."])
    assert "--images" in _usage_error(capsys, ["eval", "--weights", weights, "--data",
                                               weights, "--images", str(tmp_path / "no")])
    assert "nope.png" in _one_line_error(capsys, ["predict", "--weights", weights,
                                                  str(tmp_path / "nope.png"), "--out",
                                                  str(tmp_path / "x")], 2)
    assert not (tmp_path / "x").exists(), "nothing written for a missing input"
    assert "--out" in _usage_error(capsys, ["predict", "--weights", weights, "a.png"])
    assert "--minutes" in _usage_error(capsys, ["demo", "--minutes", "-1"])
    assert "--iters" in _usage_error(capsys, ["demo", "--iters", "0"])
    assert "not allowed with" in _usage_error(capsys, ["demo", "--iters", "5", "--minutes", "1"])
    assert "invalid float" in _usage_error(capsys, ["demo", "--minutes", "soon"])
    assert "nonsense" in _usage_error(capsys, ["nonsense"])
    import torch
    torch.save({"model": {}, "config": {}, "x": Pickled()}, tmp_path / "evil.pth")
    err = _one_line_error(capsys, ["predict", "--weights", str(tmp_path / "evil.pth"),
                                   str(config), "--out", str(tmp_path / "p")], 1)
    assert "evil.pth" in err and "refused" in err
    err = _usage_error(capsys, ["predict", "--weights", weights, ".", "--out", "x",
                                "--set", "box_score_tresh=0.2"])
    assert "box_score_tresh" in err


class Pickled:
    """An arbitrary Python object: weights_only loading refuses it."""


def test_help_documents_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "eval", "predict", "demo", "zoo", "export-weights",
                                "export", "doctor", "convert-data", "check-data"}
    for name, subparser in sub.choices.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in subparser._actions:
            assert action.help, (name, action.dest)
            for option in action.option_strings:
                assert option in text, (name, option)


def test_console_script_is_installed():
    run = subprocess.run([str(PACKAGE_DIR / ".venv" / "bin" / "maskrcnn"), "demo", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--minutes" in run.stdout


def test_eval_progress_bar_follows_no_progress(trained, shapes_data, capsys):
    _, out = trained
    vj, vi = shapes_data["val"]
    argv = ["eval", "--weights", str(latest_checkpoint(out)), "--data", str(vj),
            "--images", str(vi)]
    capsys.readouterr()
    assert main(argv) == 0
    stdout, stderr = capsys.readouterr()
    assert "eval" in stderr and "4/4" in stderr                     # the bar, 4 val images
    assert stdout.count("category") == 1                            # the table once
    assert main(argv + ["--no-progress"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "4/4" not in stderr and stdout.count("category") == 1


@pytest.mark.slow
def test_predict_progress_bar_follows_no_progress(trained, shapes_data, tmp_path, capsys):
    _, out = trained
    vi = shapes_data["val"][1]
    n = len(list(vi.glob("*.png")))
    argv = ["predict", "--weights", str(latest_checkpoint(out)), str(vi)]
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert f"{n}/{n}" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert f"{n}/{n}" not in capsys.readouterr().err


@pytest.mark.slow
def test_train_without_bar_prints_a_line_per_log_interval(trained, tmp_path, capsys):
    config, _ = trained
    argv = ["train", "--config", str(config), "--set", "max_iter=2", "log_every=1",
            f"output_dir={tmp_path / 'run'}", *TINY_SETS]
    capsys.readouterr()
    assert main(argv + ["--no-progress"]) == 0
    stdout, stderr = capsys.readouterr()
    assert [ln.split("  ")[0] for ln in stdout.splitlines()
            if ln.startswith("iter ")] == ["iter 1/2", "iter 2/2"]
    assert "train:" not in stderr
    assert main(argv) == 0                                          # the bar instead
    stdout, stderr = capsys.readouterr()
    assert "train:" in stderr and not [ln for ln in stdout.splitlines()
                                       if ln.startswith("iter ")]


def test_train_without_tensorboard_is_a_usage_error(tiny_cfg, tmp_path, monkeypatch, capsys,
                                                    write_ini):
    """[solver] tensorboard = true without the package: one usage line, not a traceback."""
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # not installed
    ini = write_ini(tiny_cfg(tensorboard=True), tmp_path / "tb.ini")
    err = _usage_error(capsys, ["train", "--config", str(ini), "--no-progress"])
    assert "pip install tensorboard" in err and "Traceback" not in err
