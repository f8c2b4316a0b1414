"""Inference from a signed checkpoint: evaluate it on a test split, classify image files, export it to ONNX.

A checkpoint carries its run config and its data's preprocessing (``ClassifierModule`` hyperparameters), so
each command rebuilds the network, and the data or the input pipeline, from the checkpoint alone. Run keys
given on the command line (``data.root=...``, ``trainer.precision=...``) override the stored config, which is
then checked by the same schema as a training run's. Everything runs in one process on one device.
"""

from __future__ import annotations

import copy
import csv
import difflib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.figure import Figure
from omegaconf import Container, DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassConfusionMatrix

from t240dist import report
from t240dist.callbacks import Preemption
from t240dist.checkpoint import CheckpointError, load_checkpoint, write_atomically
from t240dist.config import (
    EvaluateOptions,
    ExportOptions,
    PredictOptions,
    RunConfig,
    check,
    plain,
    validate_run,
    with_later_keys,
)
from t240dist.data import (
    IMAGE_EXTENSIONS,
    DataInfo,
    ImageDataModule,
    Trained,
    file_transform,
    folder_images,
    load_rgb,
    loader_workers,
)
from t240dist.errors import ConfigError, UserError
from t240dist.fit import build_trainer, callback_of
from t240dist.loggers import log_metrics, tensorboard
from t240dist.module import ClassifierModule

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # trainer.precision


class ExportError(UserError):
    """An exported model does not compute what the checkpoint computes."""


def evaluate(cfg: DictConfig, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """Score a checkpoint with the Trainer's test loop (the metrics of training), per-class accuracy and a
    confusion matrix; write ``eval_summary.json``, ``confusion_matrix.png`` and the metrics to the loggers."""
    started = time.perf_counter()
    restored = restore(cfg, overrides, EvaluateOptions)
    conf = restored.conf
    data = ImageDataModule(conf["data"], conf["seed"], restored.trained)
    restored.check_data(data.info)
    names = restored.hp["class_names"]
    confusion = ConfusionMatrix(names, out_dir / "confusion_matrix.png")
    trainer, _, _ = build_trainer(conf, out_dir, extra=[confusion])
    with callback_of(trainer, Preemption).handling():  # a signal stops it with one line, not exit 0
        tested = trainer.test(restored.module(), datamodule=data, verbose=False)[0]
    matrix = confusion.matrix
    summary = {
        "checkpoint": str(restored.path),
        "test_acc": tested["test/acc"],
        "test_top5": tested.get("test/top5"),
        "test_loss": tested["test/loss"],
        "images": int(matrix.sum()),
        "per_class_acc": dict(zip(names, confusion.class_acc, strict=True)),
        "confusion_matrix": matrix.tolist(),  # rows: true class, columns: predicted, in per_class_acc's order
        "data": conf["data"]["name"],
        "precision": conf["trainer"]["precision"],
        "device": report.device_name(trainer.strategy.root_device),
        "wall_s": time.perf_counter() - started,
    }
    report.write_summary(summary, out_dir, name="eval", also=(confusion.png,))
    return summary


def predict(cfg: DictConfig, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """Classify image files in batches with the checkpoint's preprocessing; write one CSV row per image
    (path, top-k classes and probabilities) and ``predict_summary.json``. Unreadable files are listed."""
    restored = restore(cfg, overrides, PredictOptions)
    options, conf, preprocess = restored.options, restored.conf, restored.hp["preprocess"]
    if preprocess["channels"] not in (1, 3):
        raise ConfigError(
            f"{restored.path.name} takes {preprocess['channels']}-channel images; predict reads grey or RGB "
            "image files — use a checkpoint of a 1- or 3-channel model"
        )
    files = image_files(Path(options["input"]))
    predictor = Predictor(restored.module(), conf["trainer"], options["top_k"])
    loader = DataLoader(
        ImageFiles(files, preprocess),
        batch_size=conf["data"]["batch_size"],
        num_workers=loader_workers(conf["data"]["num_workers"]),
        collate_fn=_decoded_and_failed,
        pin_memory=predictor.device.type == "cuda",
    )
    names = restored.hp["class_names"]
    output = Path(options["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    skipped: list[dict[str, str]] = []
    started = time.perf_counter()
    partial = output.with_name(f"{output.name}.partial")  # output is replaced only by a prediction
    try:
        with partial.open("w", newline="") as f:
            rows = csv.writer(f)
            ranks = range(1, predictor.top_k + 1)
            rows.writerow(["path", *(f"{kind}_{r}" for r in ranks for kind in ("class", "prob"))])
            for indices, images, failed in loader:
                skipped += [{"path": str(files[i]), "reason": why} for i, why in failed]
                if images is None:
                    continue
                probs, classes = predictor(images)
                for i, top_probs, top_classes in zip(indices, probs.tolist(), classes.tolist(), strict=True):
                    ranked = [(names[k], f"{p:.6f}") for k, p in zip(top_classes, top_probs, strict=True)]
                    rows.writerow([str(files[i]), *(value for pair in ranked for value in pair)])
    except BaseException:  # stopped or failed: no half-written file stays
        partial.unlink(missing_ok=True)
        raise
    wall = time.perf_counter() - started
    classified = len(files) - len(skipped)
    if not classified:  # a run that classified nothing is not a prediction: it writes nothing
        partial.unlink()
        reasons = [f"{Path(row['path']).name}: {row['reason']}" for row in skipped]
        raise ConfigError(
            f"input={options['input']}: none of its {len(files)} image file(s) could be decoded "
            f"({_few(reasons)}) — give images Pillow reads ({' '.join(IMAGE_EXTENSIONS)})"
        )
    partial.replace(output)
    summary = {
        "checkpoint": str(restored.path),
        "input": options["input"],
        "output": str(output),
        "images": classified,
        "images_per_s": classified / wall,
        "wall_s": wall,
        "skipped_files": len(skipped),
        "skipped": skipped,
        "top_k": predictor.top_k,
        "batch_size": conf["data"]["batch_size"],
        "precision": conf["trainer"]["precision"],
        "device": report.device_name(predictor.device),
    }
    report.write_summary(summary, out_dir, name="predict")
    return summary


def export(cfg: DictConfig, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """Write the network as an fp32 ONNX model (any batch size; class names and preprocessing in its
    metadata) and check ONNX Runtime's logits against PyTorch's on real images of the test split."""
    restored = restore(cfg, overrides, ExportOptions)
    options, conf = restored.options, restored.conf
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(f"format=onnx needs {err.name} — pip install 't240dist[export]'") from None
    data = ImageDataModule(conf["data"], conf["seed"], restored.trained)
    restored.check_data(data.info)
    test = data.test_set
    images = torch.stack([test[i][0] for i in range(min(options["check_images"], len(test)))])
    net = restored.module(compile=False).net  # torch.export traces the plain network
    # torch.onnx's default exporter (torch.export-based, needs onnxscript); the TorchScript one is deprecated
    program = torch.onnx.export(
        net,
        (images,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: "batch"},),
        dynamo=True,
        verbose=False,
    )
    model = program.model_proto
    metadata = {"class_names": restored.hp["class_names"], "preprocess": restored.hp["preprocess"]}
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    output = Path(options["output"])
    write_atomically(output, model.SerializeToString())
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.inference_mode():
        torch_logits = net(images).numpy()
    diff = float(np.abs(onnx_logits - torch_logits).max())
    summary = {
        "checkpoint": str(restored.path),
        "format": options["format"],
        "output": str(output),
        "opset": next(o.version for o in model.opset_import if o.domain == ""),
        "check_images": len(images),
        "max_abs_diff": diff,
        "tolerance": options["tolerance"],
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    report.write_summary(summary, out_dir, name="export")
    if diff > options["tolerance"]:
        raise ExportError(
            f"ONNX Runtime's logits differ from PyTorch's by up to {diff:.3g} on {len(images)} test images "
            f"(tolerance={options['tolerance']:g}) — {output} is kept for inspection; do not deploy it as is"
        )
    return summary


@dataclass(frozen=True)
class Restored:
    """A verified checkpoint and its run config rebuilt: what every inference command starts from."""

    path: Path
    options: dict[str, Any]  # the command's own keys: ckpt, input, output, ...
    conf: dict[str, Any]  # the stored run config, overridden by the command line, validated
    hp: dict[str, Any]  # ClassifierModule's hyperparameters, as stored
    state_dict: dict[str, torch.Tensor]

    @property
    def trained(self) -> Trained:
        """The training data's normalisation and classes: evaluation uses them instead of new statistics and
        of an image folder's own classes."""
        return Trained(self.hp["preprocess"]["mean"], self.hp["preprocess"]["std"], self.hp["class_names"])

    def module(self, **model: Any) -> ClassifierModule:
        """The network with the checkpoint's weights, in eval mode, built as the (overridden) config says;
        ``model`` overrides model switches for this use only (export: ``compile=False``)."""
        conf = {**self.conf, "model": {**self.conf["model"], **model}}
        module = ClassifierModule.from_hparams(self.hp, conf)
        try:
            module.load_state_dict(self.state_dict)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"{self.path}'s weights do not fit model={conf['model']['name']} ({first}) — "
                "drop the model overrides"
            ) from None
        return module.eval()

    def check_data(self, info: DataInfo) -> None:
        """Refuse data whose classes or channels differ from the checkpoint's: scores would mean nothing."""
        hp = self.hp
        if info.class_names != hp["class_names"] or info.channels != hp["in_channels"]:
            raise ConfigError(
                f"data={self.conf['data']['name']} has {info.channels}-channel images of {info.num_classes} "
                f"classes ({_few(info.class_names)}), {self.path.name} was trained on "
                f"{hp['in_channels']}-channel images of {hp['num_classes']} ({_few(hp['class_names'])}) — "
                "give data with the same classes"
            )


def restore(cfg: DictConfig, overrides: list[str], options: type[EvaluateOptions]) -> Restored:
    """Verify the checkpoint that ``ckpt=`` names and rebuild its run config with the command line's keys.

    ``cfg`` is the command's composed config: its own keys, plus the training config's so that Hydra parses
    and types run keys as a training run's. Only the run keys (or groups) in ``overrides`` are taken from it.
    """
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise CheckpointError(f"ckpt is not set — {_checkpoint_hint(None)}")
    own = plain(OmegaConf.masked_copy(cfg, list(options.model_fields)))
    check(options, own)
    path = Path(own["ckpt"])
    if not path.is_file():
        what = "is a folder, not a checkpoint" if path.is_dir() else "does not exist"
        raise CheckpointError(f"ckpt={path} {what} — {_checkpoint_hint(path)}")
    checkpoint = load_checkpoint(path, cfg.checkpoint.trust_unsigned is True, map_location="cpu")
    hp = checkpoint.get("hyper_parameters") or {}
    if "config" not in hp or "preprocess" not in hp:
        raise CheckpointError(
            f"{path} holds no run config (saved by an older t240dist, or not by t240dist) — "
            "retrain with this version to evaluate, predict or export it"
        )
    stored = with_later_keys(copy.deepcopy(hp["config"]))
    stored["resume"] = "never"
    if stored["model"]["compile"] == "step":  # the training step's fast path: inference has no such step
        stored["model"]["compile"] = False
    if "decode" in stored["data"]:  # where files decode is this machine's choice, not the training machine's
        stored["data"]["decode"] = "auto"
    stored["trainer"].update(devices=1, num_nodes=1, strategy="auto")  # a DDP run is scored on one device
    for key in _run_keys(overrides, options):
        node = OmegaConf.select(cfg, key)
        *parents, leaf = key.split(".")
        target = stored
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node
    conf = validate_run(stored)
    _check_one_device(conf["trainer"])
    return Restored(path, own, conf, hp, checkpoint["state_dict"])


def _checkpoint_hint(missing: Path | None) -> str:
    """A checkpoint to give instead of a missing one: in a run dir given for one, its best; else the closest
    name in the missing file's folder (or in the ``checkpoints/`` of a run dir); else, and where none was
    given, the newest checkpoint of the runs under ./outputs."""
    folders = (
        []
        if missing is None
        else [missing / "checkpoints", missing, missing.parent, missing.parent / "checkpoints"]
    )
    for folder in folders:
        near = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if near:
            best = ["best.ckpt"] if missing.is_dir() and "best.ckpt" in near else []
            closest = best or difflib.get_close_matches(missing.name, near, n=1, cutoff=0) or near
            return f"{folder} holds {', '.join(near)}: ckpt={folder / closest[0]}"
    runs = sorted(Path("outputs").glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if runs:
        return f"the newest checkpoint under outputs/ is ckpt={runs[-1]}"
    return "give a checkpoint of a run, e.g. ckpt=RUN_DIR/checkpoints/best.ckpt"


def _run_keys(overrides: list[str], options: type[EvaluateOptions]) -> list[str]:
    """The keys (or groups) of the run config that the command line overrides, in order."""
    keys = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        head = key.split(".")[0]
        if head in RunConfig.model_fields:
            keys.append(key)
        elif head not in options.model_fields:
            raise ConfigError(
                f"{override.input_line} does not apply to a checkpoint — override the run's keys "
                "(data.root=..., trainer.precision=...) or this command's own"
            )
    return keys


def _check_one_device(trainer: dict[str, Any]) -> None:
    """Inference runs in this process on one device: a DDP launch would re-run the command per rank."""
    devices = trainer["devices"]
    one = devices == 1 or (isinstance(devices, list) and len(devices) == 1)
    if not one or trainer["num_nodes"] != 1 or trainer["strategy"] != "auto":
        raise ConfigError(
            f"trainer.devices={devices} trainer.num_nodes={trainer['num_nodes']} "
            f"trainer.strategy={trainer['strategy']}: inference runs on one device — drop those overrides "
            "(trainer.devices=[N] picks GPU N)"
        )


class ConfusionMatrix(pl.Callback):
    """Counts (true, predicted) class pairs in the test loop from the logits ``test_step`` returns, on the
    device; at the end draws the matrix (PNG, and TensorBoard's image) and logs the per-class accuracies."""

    def __init__(self, class_names: list[str], png: Path) -> None:
        self.names, self.png = class_names, png
        self.metric = MulticlassConfusionMatrix(len(class_names), validate_args=False)
        self.matrix = torch.zeros(0)
        self.class_acc: list[float | None] = []

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metric = self.metric.to(pl_module.device)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.metric.update(outputs, batch[1])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.matrix = self.metric.compute().cpu()
        self.class_acc = class_accuracy(self.matrix)
        figure = self._figure()
        self.png.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.png, dpi=100)
        if (board := tensorboard(trainer)) is not None:
            board.experiment.add_figure("test/confusion_matrix", figure, trainer.global_step)
        accuracies = zip(self.names, self.class_acc, strict=True)
        per_class = {f"test/class_acc/{name}": acc for name, acc in accuracies if acc is not None}
        log_metrics(trainer, per_class, trainer.global_step)

    def _figure(self) -> Figure:
        """torchmetrics' drawing of the matrix; counts and class names only while they stay legible.

        matplotlib (a dependency for this) rather than pixels drawn with PIL: axes, labels and a colour scale
        come with it, and TensorBoard's ``add_figure`` takes the same figure.
        """
        n = len(self.names)
        side = min(3 + 0.6 * n, 20)  # inches
        figure = Figure(figsize=(side, side), layout="constrained")
        ax = figure.subplots()
        self.metric.plot(self.matrix, ax=ax, add_text=n <= 20, labels=self.names if n <= 50 else None)
        if n > 50:
            ax.set_xticks([])
            ax.set_yticks([])
        return figure


def class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Each class's recall (correct / its test images) from a confusion matrix; None for an absent class."""
    correct, total = matrix.diagonal().tolist(), matrix.sum(dim=1).tolist()
    return [c / t if t else None for c, t in zip(correct, total, strict=True)]


class Predictor:
    """A restored network classifying batches the way ``predict`` does: on its device, in eval and
    inference mode, under the run's precision (autocast) and memory format, top-k read back to the host."""

    def __init__(self, module: ClassifierModule, trainer: dict[str, Any], top_k: int) -> None:
        self.device = inference_device(trainer)
        self.module = module.to(self.device).eval()
        self.dtype = AUTOCAST[trainer["precision"]]
        self.top_k = min(top_k, module.hparams["num_classes"])

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and class indices of the ``top_k`` classes of each image, on the host."""
        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = self.module(images.to(self.device, non_blocking=True))
            probs, classes = logits.float().softmax(dim=1).topk(self.top_k, dim=1)
            return probs.cpu(), classes.cpu()


def inference_device(trainer: dict[str, Any]) -> torch.device:
    """The one device that ``trainer.accelerator`` and ``trainer.devices`` name (validated beforehand)."""
    if trainer["accelerator"] == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    devices = trainer["devices"]
    return torch.device("cuda", devices[0] if isinstance(devices, list) else 0)


def image_files(path: Path) -> list[Path]:
    """What ``input=`` names: one file, or the image files (by extension) anywhere under a folder, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"input={path} does not exist — give an image file or a folder of images")
    files = folder_images(path)
    if not files:
        raise ConfigError(
            f"input={path} holds no image files ({' '.join(IMAGE_EXTENSIONS)}) — give a folder of images"
        )
    return files


class ImageFiles(Dataset):
    """Image files decoded as the training data were and put through the checkpoint's eval transform.

    A file that cannot be decoded yields the reason instead of an image: predict lists it and goes on.
    """

    def __init__(self, files: list[Path], preprocess: dict[str, Any]) -> None:
        self.files = files
        self.transform = file_transform(preprocess)
        self.grey = preprocess["channels"] == 1

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = load_rgb(str(self.files[i]))
            return i, self.transform(image.convert("L") if self.grey else image), ""
        except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, DecompressionBombError...
            first = str(err).strip().splitlines()[:1]
            return i, None, ": ".join([type(err).__name__, *first])


def _decoded_and_failed(
    samples: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch of the decoded files (indices and stacked images) and the (index, reason) of the others."""
    decoded = [(i, image) for i, image, _ in samples if image is not None]
    failed = [(i, why) for i, image, why in samples if image is None]
    images = torch.stack([image for _, image in decoded]) if decoded else None
    return [i for i, _ in decoded], images, failed


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
