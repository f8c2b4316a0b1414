"""Inference from a real run's checkpoint: evaluate, predict image files, export to ONNX, refuse tampering."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import NOISE, TINY, compose, fits_80_columns, run_cli
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from t240dist.checkpoint import KEY_ENV, CheckpointError, load_checkpoint
from t240dist.config import compose_config, validate
from t240dist.data import ImageDataModule, Trained, file_transform, load_rgb
from t240dist.errors import ConfigError, Preempted
from t240dist.inference import ConfusionMatrix, EvaluateOptions, evaluate, export, predict, restore
from t240dist.module import ClassifierModule
from t240dist.run import train

CLASSES = [f"class_{k}" for k in range(10)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The summary of one tiny training run, signed with a test key, that every test here infers from."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, "test-key")
        yield train(compose(TINY), run_dir=tmp_path_factory.mktemp("tiny") / "run")


def _stored(run: dict) -> dict:
    return load_checkpoint(Path(run["best_checkpoint"]), trust_unsigned=False)


def test_checkpoints_carry_the_run_config_and_the_datas_preprocessing(run: dict) -> None:
    hp = torch.load(run["best_checkpoint"], weights_only=True)["hyper_parameters"]
    assert hp["config"] == validate(compose(TINY))
    assert hp["preprocess"] == {
        "channels": 3,
        "image_size": 8,
        "resize": 8,
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
    }


def test_evaluation_data_takes_the_checkpoints_normalisation_instead_of_new_statistics() -> None:
    digits = validate(compose(["data=digits"]))["data"]
    fresh = ImageDataModule(digits, 0)
    given = ImageDataModule(digits, 0, Trained([0.5], [0.25], fresh.info.class_names))
    assert fresh.info.mean != [0.5] and given.info.preprocess["mean"] == [0.5]
    raw = fresh.test_set.images[0].float() / 255
    assert torch.allclose(given.test_set[0][0], (raw - 0.5) / 0.25)
    assert given.test_set[0][1] == fresh.test_set[0][1]


def test_an_image_folder_is_scored_with_the_classes_the_checkpoint_was_trained_on(tmp_path: Path) -> None:
    """A folder to evaluate may hold any of the model's classes: its labels are the model's, not numbered
    from its own folders; a class the model does not know is refused."""
    names = ["ant", "bee", "cat", "dog"]
    for split, classes in (("train", names), ("val", names), ("other/train", ["bee", "dog"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 12), (60 * names.index(name), 40 * i, 0)).save(
                    tmp_path / split / name / f"{i}.png"
                )
    (tmp_path / "other" / "val").symlink_to(tmp_path / "other" / "train")
    tree = [
        "data=imagefolder",
        "data.image_size=8",
        "data.batch_size=4",
        "model.width=4",
        "trainer.max_epochs=1",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, "test-key")
        done = train(
            compose([*tree, f"data.root={tmp_path}", "trainer.enable_progress_bar=false"]), tmp_path / "run"
        )
        overrides = [f"ckpt={done['best_checkpoint']}", f"data.root={tmp_path / 'other'}"]
        summary = evaluate(compose_config(overrides, "evaluate"), overrides, tmp_path / "eval")
        assert set(summary["per_class_acc"]) == set(names)  # ... scored as the model's 4 classes
        matrix = summary["confusion_matrix"]
        assert [sum(row) for row in matrix] == [0, 3, 0, 3]  # rows: the true classes, bee and dog alone
        (tmp_path / "other" / "train" / "eel").mkdir()
        Image.new("RGB", (12, 12)).save(tmp_path / "other" / "train" / "eel" / "0.png")
        with pytest.raises(
            ConfigError, match=r"train' has class folder\(s\) that the checkpoint was not trained on \(eel\)"
        ):
            evaluate(compose_config(overrides, "evaluate"), overrides, tmp_path / "eval2")


def test_evaluate_reproduces_the_runs_test_accuracy_per_class_and_as_a_confusion_matrix(
    run: dict, tmp_path: Path
) -> None:
    args = [f"ckpt={run['best_checkpoint']}", "data.batch_size=16", f"hydra.run.dir={tmp_path}"]
    done = run_cli(args, cwd=tmp_path, entry="train.evaluate", COLUMNS="80")
    assert done.returncode == 0, done.stderr[-2000:]
    # where it wrote, whole, in 80 columns and in its log
    wrote = [f"wrote {tmp_path / 'eval_summary.json'}", f"wrote {tmp_path / 'confusion_matrix.png'}"]
    fits_80_columns(done.stdout, [f"checkpoint: {run['best_checkpoint']}", *wrote])
    assert all(line in (tmp_path / "evaluate.log").read_text() for line in wrote)
    assert [line for line in done.stdout.splitlines() if any(noise in line for noise in NOISE)] == []

    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert summary["test_acc"] == run["test_acc"] and summary["test_top5"] == run["test_top5"]
    matrix = np.array(summary["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == summary["images"] == 64
    assert np.trace(matrix) / 64 == pytest.approx(run["test_acc"])
    per_class = summary["per_class_acc"]
    assert list(per_class) == CLASSES
    support = matrix.sum(axis=1)
    assert list(per_class.values()) == [matrix[k, k] / n if n else None for k, n in enumerate(support)]

    with Image.open(tmp_path / "confusion_matrix.png") as png:
        assert png.format == "PNG" and min(png.size) >= 300
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert events.Tags()["images"] == ["test/confusion_matrix"]
    assert events.Scalars("test/acc")[0].value == pytest.approx(run["test_acc"])
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("test/class_acc/")]
    logged = {tag.removeprefix("test/class_acc/"): events.Scalars(tag)[0].value for tag in tags}
    assert logged == pytest.approx({name: acc for name, acc in per_class.items() if acc is not None})


def test_tampered_and_unsigned_checkpoints_are_refused_with_one_line(run: dict, tmp_path: Path) -> None:
    good = Path(run["best_checkpoint"])
    tampered = tmp_path / "tampered.ckpt"
    data = bytearray(good.read_bytes())
    data[100] ^= 0x01
    tampered.write_bytes(bytes(data))
    args = [f"ckpt={tampered}", f"input={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}"]
    done = run_cli(args, cwd=tmp_path, entry="train.predict")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"CheckpointError: {tampered} is damaged (its sha256 does not match) — use an earlier checkpoint"
    ]

    unsigned = tmp_path / "unsigned.ckpt"
    torch.save(_stored(run), unsigned)
    overrides = [f"ckpt={unsigned}"]
    with pytest.raises(CheckpointError, match=r"carries no t240dist signature — .*trust_unsigned=true"):
        evaluate(compose_config(overrides, "evaluate"), overrides, tmp_path / "eval")
    trusted = [*overrides, "checkpoint.trust_unsigned=true"]
    summary = evaluate(compose_config(trusted, "evaluate"), trusted, tmp_path / "eval")
    assert summary["test_acc"] == run["test_acc"]


def test_predict_says_where_it_wrote_in_80_columns_and_in_its_log(run: dict, tmp_path: Path) -> None:
    _image_folder(tmp_path / "images")
    args = [
        f"ckpt={run['best_checkpoint']}",
        "input=images",  # given relative to the working folder: said whole
        "output=preds.csv",
        "hydra.run.dir=out",
    ]
    done = run_cli([*args, "data.num_workers=4"], cwd=tmp_path, entry="train.predict", COLUMNS="80")
    assert done.returncode == 0, done.stderr[-2000:]
    wrote = [f"wrote {tmp_path / 'preds.csv'}", f"wrote {tmp_path / 'out' / 'predict_summary.json'}"]
    fits_80_columns(done.stdout, [f"input: {tmp_path / 'images'}", *wrote])
    assert all(line in (tmp_path / "out" / "predict.log").read_text() for line in wrote)
    assert [line for line in done.stdout.splitlines() if any(noise in line for noise in NOISE)] == []
    assert "Our suggested max number of worker" not in done.stderr  # 4 workers, at most the CPUs


def test_an_unset_or_folder_ckpt_is_answered_with_a_checkpoint_that_evaluates(
    run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^ckpt is not set — give a checkpoint of a run, e\.g\. ckpt="):
        evaluate(compose_config([], "evaluate"), [], tmp_path / "no")
    newest = tmp_path / "outputs" / "day" / "run" / "checkpoints" / "last.ckpt"
    newest.parent.mkdir(parents=True)
    newest.write_bytes(Path(run["best_checkpoint"]).parent.joinpath("last.ckpt").read_bytes())
    with pytest.raises(
        CheckpointError, match=r"the newest checkpoint under outputs/ is ckpt=outputs/day/run/"
    ):
        evaluate(compose_config([], "evaluate"), [], tmp_path / "no")
    run_dir = Path(run["best_checkpoint"]).parent.parent
    with pytest.raises(CheckpointError, match=rf"^ckpt={run_dir} is a folder, not a checkpoint — ") as err:
        evaluate(compose_config([f"ckpt={run_dir}"], "evaluate"), [f"ckpt={run_dir}"], tmp_path / "no")
    hint = [f"ckpt={str(err.value).split(': ckpt=')[-1]}"]
    assert hint == [f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}"]
    assert evaluate(compose_config(hint, "evaluate"), hint, tmp_path / "eval")["test_acc"] == run["test_acc"]


@pytest.mark.slow
def test_a_missing_checkpoint_is_answered_with_one_that_evaluates(run: dict, tmp_path: Path) -> None:
    best = Path(run["best_checkpoint"])
    typo = best.parent / "bset.ckpt"
    done = run_cli([f"ckpt={typo}", f"hydra.run.dir={tmp_path / 'no'}"], cwd=tmp_path, entry="train.evaluate")
    assert done.returncode == 2 and not (tmp_path / "no").exists()
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"CheckpointError: ckpt={typo} does not exist — {best.parent} holds best.ckpt,")
    hint = line.split(": ckpt=")[-1]
    again = run_cli(
        [f"ckpt={hint}", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path, entry="train.evaluate"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "eval_summary.json").read_text())["test_acc"] == run["test_acc"]


def _image_folder(root: Path) -> list[Path]:
    """Real files of several formats, modes and sizes, and two unreadable ones; returns the readable ones."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    (root / "a_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "a_truncated.png")
    whole = (root / "a_truncated.png").read_bytes()
    (root / "a_truncated.png").write_bytes(whole[: len(whole) // 2])
    good = {
        "b_rgb.png": Image.fromarray(rng.integers(0, 256, (17, 30, 3), dtype=np.uint8)),
        "c_photo.jpg": Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
        "d_grey.png": Image.fromarray(rng.integers(0, 256, (5, 9), dtype=np.uint8)),
        "e_rgba.png": Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA"),
        "sub/f_deep.png": Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16)),
    }
    for name, image in good.items():
        image.save(root / name)
    (root / "notes.txt").write_text("not an image, and not named like one: not a candidate")
    (root / "._c_photo.jpg").write_bytes(b"\0\5\x16\7 a macOS resource fork: hidden, not a candidate")
    return [root / name for name in good]


def test_predict_classifies_image_files_as_the_network_does_and_lists_unreadable_ones(
    run: dict, tmp_path: Path
) -> None:
    good = _image_folder(tmp_path / "images")
    out = tmp_path / "preds.csv"
    overrides = [f"ckpt={run['best_checkpoint']}", f"input={tmp_path / 'images'}", f"output={out}"]
    overrides += ["top_k=3", "data.batch_size=2", "data.num_workers=2"]  # batch 1: no readable file
    summary = predict(compose_config(overrides, "predict"), overrides, tmp_path / "run")

    assert summary["images"] == 5 and summary["skipped_files"] == 2 and summary["images_per_s"] > 0
    skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert skipped.keys() == {"a_broken.jpg", "a_truncated.png"} and all(skipped.values())
    assert json.loads((tmp_path / "run" / "predict_summary.json").read_text()) == summary

    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert [row["path"] for row in rows] == [str(p) for p in good]
    for row in rows:
        probs = [float(row[f"prob_{r}"]) for r in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert len({row[f"class_{r}"] for r in (1, 2, 3)}) == 3 <= len(CLASSES)

    # what the CSV says is what the checkpoint's network says about the file, preprocessed as stored
    stored = _stored(run)
    module = ClassifierModule(**stored["hyper_parameters"])
    module.load_state_dict(stored["state_dict"])
    x = file_transform(stored["hyper_parameters"]["preprocess"])(load_rgb(str(good[2])))
    with torch.inference_mode():
        probs, classes = module.eval()(x[None]).softmax(dim=1)[0].topk(3)
    grey = rows[2]
    assert [grey[f"class_{r}"] for r in (1, 2, 3)] == [CLASSES[k] for k in classes.tolist()]
    assert [float(grey[f"prob_{r}"]) for r in (1, 2, 3)] == pytest.approx(probs.tolist(), abs=1e-6)

    one = [f"ckpt={run['best_checkpoint']}", f"input={good[2]}", f"output={tmp_path / 'one.csv'}", "top_k=3"]
    one += ["trainer.precision=bf16-mixed", "model.channels_last=true"]
    bf16 = predict(compose_config(one, "predict"), one, tmp_path / "one")
    assert bf16["images"] == 1 and bf16["precision"] == "bf16-mixed" and bf16["device"] == "cpu"
    with (tmp_path / "one.csv").open(newline="") as f:
        [row] = list(csv.DictReader(f))
    assert float(row["prob_1"]) == pytest.approx(probs[0].item(), abs=0.02)


def test_a_signal_stops_evaluate_with_one_line_not_exit_0(
    run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM in evaluate's first test batch: it stops with Preempted (exit 75), which names no saved
    training; Lightning's own handler had ended the test as if it were done (exit 0)."""
    first_batch = ConfusionMatrix.on_test_batch_end

    def signalled(self: ConfusionMatrix, *args: Any, **kwargs: Any) -> None:
        first_batch(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # a callback before Preemption's, which acts on it

    monkeypatch.setattr(ConfusionMatrix, "on_test_batch_end", signalled)
    before = signal.getsignal(signal.SIGTERM)
    args = [f"ckpt={run['best_checkpoint']}", "data.batch_size=16"]
    with pytest.raises(Preempted, match=r"^stopped before the test ended — rerun the same command with "):
        evaluate(compose_config(args, "evaluate"), args, tmp_path)
    assert signal.getsignal(signal.SIGTERM) == before  # this process's handler, back
    assert not (tmp_path / "eval_summary.json").exists()


def test_predict_reads_a_folder_as_training_does_and_fails_where_nothing_was_classified(
    run: dict, tmp_path: Path
) -> None:
    """Linked folders are followed (training follows them), a link back up is not, hidden folders are
    skipped and a broken link is listed; a folder of which no file decodes stops with one line."""
    good = _image_folder(tmp_path / "outside")
    images = tmp_path / "images"
    (images / ".thumbnails").mkdir(parents=True)
    Image.new("RGB", (9, 9)).save(images / ".thumbnails" / "t.jpg")
    Image.new("RGB", (9, 9), (200, 0, 0)).save(images / "own.png")
    os.symlink(tmp_path / "outside", images / "linked")
    os.symlink("..", images / "linked_up")
    os.symlink(tmp_path / "gone.jpg", images / "gone.jpg")
    overrides = [f"ckpt={run['best_checkpoint']}", f"input={images}", f"output={tmp_path / 'p.csv'}"]
    summary = predict(compose_config(overrides, "predict"), overrides, tmp_path / "run")
    with (tmp_path / "p.csv").open(newline="") as f:
        paths = [Path(row["path"]).relative_to(images).as_posix() for row in csv.DictReader(f)]
    linked = [f"linked/{p.relative_to(tmp_path / 'outside').as_posix()}" for p in good]
    assert paths == ["own.png", *linked]  # a folder's files, then its sub-folders'
    skipped = sorted(Path(s["path"]).name for s in summary["skipped"])
    assert skipped == ["a_broken.jpg", "a_truncated.png", "gone.jpg"]
    bad = [f"ckpt={run['best_checkpoint']}", f"input={tmp_path / 'outside' / 'a_broken.jpg'}"]
    bad += [f"output={tmp_path / 'bad.csv'}"]
    (tmp_path / "bad.csv").write_text("an earlier prediction\n")
    with pytest.raises(ConfigError, match=r"none of its 1 image file\(s\) could be decoded \(a_broken.jpg: "):
        predict(compose_config(bad, "predict"), bad, tmp_path / "bad")
    # nothing predicted, nothing written: the earlier output stays, no summary claims a prediction
    assert (tmp_path / "bad.csv").read_text() == "an earlier prediction\n"
    assert not (tmp_path / "bad.csv.partial").exists() and not (tmp_path / "bad").exists()


def test_export_writes_an_onnx_model_that_onnx_runtime_runs_like_pytorch(
    run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    overrides = [f"ckpt={run['best_checkpoint']}", f"output={path}", "check_images=8"]
    with caplog.at_level(logging.INFO):
        summary = export(compose_config(overrides, "export"), overrides, tmp_path)
    assert [r.name for r in caplog.records if r.name.startswith(("onnx", "torch.onnx"))] == []  # no chatter
    assert f"wrote {path}" in caplog.messages
    assert summary["check_images"] == 8 and summary["max_abs_diff"] <= 1e-4
    assert json.loads((tmp_path / "export_summary.json").read_text()) == summary

    stored = _stored(run)
    hp = stored["hyper_parameters"]
    metadata = {prop.key: json.loads(prop.value) for prop in onnx.load(path).metadata_props}
    assert metadata == {"class_names": hp["class_names"], "preprocess": hp["preprocess"]}
    module = ClassifierModule(**hp)
    module.load_state_dict(stored["state_dict"])
    test_set = ImageDataModule(hp["config"]["data"], hp["config"]["seed"]).test_set
    images = torch.stack([test_set[i][0] for i in range(20, 25)])  # other images, another batch size
    (logits,) = onnxruntime.InferenceSession(str(path)).run(None, {"images": images.numpy()})
    with torch.inference_mode():
        expected = module.eval()(images).numpy()
    assert logits.shape == (5, 10) and np.abs(logits - expected).max() <= 1e-4


def test_a_checkpoint_from_before_a_config_key_existed_evaluates_with_its_default(
    run: dict, tmp_path: Path
) -> None:
    """A checkpoint whose stored config lacks keys added since (data.on_gpu, model.compile) is scored as
    before: the missing keys take their conf/ defaults, the stored ones stay."""
    older = _stored(run)
    config = older["hyper_parameters"]["config"]
    del config["data"]["on_gpu"], config["model"]["compile"]
    path = tmp_path / "older.ckpt"
    torch.save(older, path)
    overrides = [f"ckpt={path}", "checkpoint.trust_unsigned=true"]
    summary = evaluate(compose_config(overrides, "evaluate"), overrides, tmp_path / "eval")
    assert summary["test_acc"] == run["test_acc"]


def test_where_files_decode_is_decided_for_the_evaluating_machine(run: dict, tmp_path: Path) -> None:
    """A checkpoint trained with data.decode=device (a GPU's auto) is evaluated on this CPU machine with the
    workers decoding, unless the command line says where."""
    trained = _stored(run)
    folders = validate(compose(["data=imagefolder", f"data.root={tmp_path}", "data.decode=device"]))["data"]
    trained["hyper_parameters"]["config"]["data"] = folders
    path = tmp_path / "gpu.ckpt"
    torch.save(trained, path)
    for given, decode in (([], "workers"), (["data.decode=device"], "device")):
        overrides = [f"ckpt={path}", "checkpoint.trust_unsigned=true", *given]
        assert (
            restore(compose_config(overrides, "evaluate"), overrides, EvaluateOptions).conf["data"]["decode"]
            == decode
        )
