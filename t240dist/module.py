"""ClassifierModule: cross-entropy training of any network, with torchmetrics and timm-style switches."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from t240dist import report
from t240dist.data import DataInfo
from t240dist.models import build_model, compile_network
from t240dist.optim import configure_optimizers, replan

Batch = tuple[torch.Tensor, torch.Tensor]
LossAndLogits = tuple[torch.Tensor, torch.Tensor]
# Eager steps before the step is captured (model.compile=step): lazy set-up (cuBLAS/cuDNN handles and
# workspaces, the optimizer's state) must happen before capture, as PyTorch's CUDA-graph notes require.
GRAPH_WARMUP_STEPS = 3
CONFIG_GROUPS = ("model", "optim", "sched", "module")  # the run config's groups the module is built from
TRAIN_CURVES = ("train/loss", "train/acc")  # what training_step hands over on logging steps, in this order
VAL = ("val/loss", "val/acc", "val/top5")  # what a validation logs


class ClassifierModule(pl.LightningModule):
    """Trains, validates and tests an image classifier.

    Hyperparameters are plain dicts, lists, numbers and strings (the resolved config groups, the data's
    class names, the whole run config and the data's preprocessing), so a checkpoint loads with
    ``torch.load(weights_only=True)`` and carries what inference needs to rebuild the network, its data
    and its input pipeline, and to name its predictions. The training step never waits for the device:
    metrics leave it only when Lightning logs them. ``test_step`` returns the logits, for callbacks.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        sched: dict[str, Any],
        module: dict[str, Any],
        num_classes: int,
        in_channels: int,
        class_names: list[str],
        config: dict[str, Any],
        preprocess: dict[str, Any],
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs the whole config to the HParams tab
        self.net = build_model(model, in_channels, num_classes)
        self.cuda_graphs = compile_network(self.net, model["compile"])
        self.step_graph: StepGraph | None = None  # model.compile=step: captured after GRAPH_WARMUP_STEPS
        self._graphed = model["compile"] == "step"
        self._eager_steps = 0
        self._replayed = False  # whether this step's gradients came from a replay (no backward, no zero_grad)
        self.channels_last = model["channels_last"]
        self.label_smoothing = module["label_smoothing"]
        self.mix = _batch_mixer(module, num_classes)
        self.schedule: dict[str, Any] = {}  # the lr schedule as configure_optimizers planned it
        self.restored_schedule: dict[str, Any] | None = None  # the checkpoint's ``schedule``, when resumed
        self._resumed_from: dict[str, Any] | None = None  # the checkpoint being resumed, until planned
        self.validated: dict[str, float] = {}  # the last validation's metrics, as the checkpoint kept them
        top5 = num_classes >= 5
        self.val_loss, self.test_loss = MeanLoss(), MeanLoss()
        self.val_acc, self.test_acc = _accuracy(num_classes, 1), _accuracy(num_classes, 1)
        self.val_top5 = _accuracy(num_classes, 5) if top5 else None
        self.test_top5 = _accuracy(num_classes, 5) if top5 else None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around every hook call (~50 times a step); nn.Module's
        # __setattr__ checks for parameters, buffers and modules each time (~3 µs). It is a plain string.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_config(cls, conf: dict[str, Any], info: DataInfo) -> ClassifierModule:
        """The module for a validated run config and the data it trains on."""
        groups = (conf[k] for k in CONFIG_GROUPS)
        return cls(*groups, info.num_classes, info.channels, info.class_names, conf, info.preprocess)

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any], conf: dict[str, Any]) -> ClassifierModule:
        """The module that a checkpoint's hyperparameters describe, with the groups of ``conf`` (its stored
        run config, perhaps overridden) in place of the stored ones."""
        return cls(**{**hparams, **{k: conf[k] for k in CONFIG_GROUPS}, "config": conf})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if self.cuda_graphs:  # a new step: the graphs' previous outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | dict[str, torch.Tensor]:
        x, y = batch
        loss, logits = self._replay_or_forward(x, y) if self._graphed else self._loss(x, y)
        # On the steps Lightning logs (an optimizer step's last micro-batch), the loss and accuracy go to
        # TrainLog as one tensor, which writes them once they have reached the host, without waiting
        trainer = self.trainer
        if trainer._logger_connector.should_update_logs and not trainer.fit_loop._should_accumulate():
            accuracy = (logits.detach().argmax(dim=-1) == y).float().mean()
            return {"loss": loss, "curves": torch.stack([loss.detach().float(), accuracy])}
        return loss

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> LossAndLogits:
        target: torch.Tensor = y
        if self.mix is not None:
            x, target = self.mix(x, y)
        logits = self(x)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing), logits

    def _replay_or_forward(self, x: torch.Tensor, y: torch.Tensor) -> LossAndLogits:
        """The fast path: replay the captured step (captured once the warm-up steps are done); eager for
        the warm-up and for a batch of another shape than the captured one."""
        if self.step_graph is None and self._eager_steps >= GRAPH_WARMUP_STEPS:
            self.step_graph = StepGraph(self._loss, list(self.net.parameters()), x, y)
        self._replayed = self.step_graph is not None and self.step_graph.fits(x, y)
        if self._replayed:
            return self.step_graph(x, y)
        self._eager_steps += 1
        return self._loss(x, y)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer | pl.core.optimizer.LightningOptimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes the gradients after the next forward pass, which then holds its activations and
        # the last step's gradients at once (+0.09 GiB of peak memory on ResNet-50/b256). Freed here, as a
        # hand-written loop's zero_grad before its forward frees them; a captured step keeps its own.
        if self.step_graph is None:
            optimizer.zero_grad(set_to_none=True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        # optimizer_step has freed the last step's gradients already (tests/test_train checks that none
        # are held when a step starts). Once captured, they stay in the memory the graph writes: a replay
        # has just written them, and an eager step (a batch of another shape) zeroes them in place.
        if self.step_graph is not None and not self._replayed:
            optimizer.zero_grad(set_to_none=False)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if not self._replayed:
            super().backward(loss, *args, **kwargs)

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees the gradients before validating; a captured step's gradients must stay where
        # its replays write them, or the optimizer would find none and stop updating after validation
        if self.step_graph is None:
            super().on_validation_model_zero_grad()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss, self.val_acc, self.val_top5)

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test", self.test_loss, self.test_acc, self.test_top5)

    def _evaluate(
        self,
        batch: Batch,
        split: str,
        loss: MeanLoss,
        acc: MulticlassAccuracy,
        top5: MulticlassAccuracy | None,
    ) -> torch.Tensor:
        x, y = batch
        # The fast path compiles the training step; evaluation runs eager: compiling the eval-mode network
        # again cost 3-10 s a run on an H200, a few hundred eager batches well under a second
        with torch.compiler.set_stance("force_eager") if self._graphed else nullcontext():
            logits = self(x)
        n = len(y)
        loss.update(F.cross_entropy(logits, y), n)
        self.log(f"{split}/loss", loss, batch_size=n)
        acc.update(logits, y)
        self.log(f"{split}/acc", acc, prog_bar=True, batch_size=n)
        if top5 is not None:
            top5.update(logits, y)
            self.log(f"{split}/top5", top5, batch_size=n)
        return logits

    def configure_optimizers(self) -> Any:
        # the lr schedule as planned, saved in every checkpoint: the sched group over this fit's steps
        self.schedule = {
            "sched": self.hparams["sched"],
            "steps": int(self.trainer.estimated_stepping_batches),
            "optim": dict(self.hparams["optim"]),
        }
        self._forget_replanned_schedule()
        return configure_optimizers(
            self.net, self.hparams["optim"], self.hparams["sched"], self.schedule["steps"]
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["schedule"] = self.schedule
        # the last validation's metrics, for a summary of a resumed run that validates no more (tensors:
        # reading them would wait for the GPU)
        checkpoint["validated"] = {k: v for k, v in self.trainer.callback_metrics.items() if k in VAL}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restored_schedule = checkpoint.get("schedule")
        self.validated = {k: float(v) for k, v in checkpoint.get("validated", {}).items()}
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._resumed_from = checkpoint
            self._forget_replanned_schedule()

    def _changed(self) -> list[str]:
        """The parts of the plan (``sched``, ``steps``, ``optim``) that differ from the checkpoint's; a part
        the checkpoint lacks (saved before it was recorded) counts as unchanged."""
        restored = self.restored_schedule or {}
        return [key for key, value in self.schedule.items() if key in restored and restored[key] != value]

    def _forget_replanned_schedule(self) -> None:
        """Drop the resumed checkpoint's lr schedule state where ``on_train_start`` plans the schedule again:
        Lightning would load it into this run's schedule, which may be of another kind (another ``sched``;
        a warm-up cosine planned where the saved plan was too short for warm-up steps). Decided once both
        the checkpoint and this run's plan are known (Lightning loads the schedule after both)."""
        if self._resumed_from is not None and self.schedule:
            if self._changed():
                self._resumed_from["lr_schedulers"] = []
            self._resumed_from = None

    def on_train_start(self) -> None:
        """A run resumed with another optimizer or schedule than its checkpoint's (another ``optim``; another
        length, a raised ``trainer.max_epochs``; another ``sched``) takes this config's optimizer settings and
        plans its lr schedule again, from the step it reached."""
        restored, steps, step = self.restored_schedule, self.schedule["steps"], self.trainer.global_step
        if restored is None or steps <= step:
            return
        if changed := self._changed():
            report.show_replan(changed, restored["steps"], steps, step)
            optimizer, configs = self.trainer.optimizers[0], self.trainer.lr_scheduler_configs
            scheduler = replan(optimizer, self.net, self.hparams["optim"], self.hparams["sched"], steps, step)
            if configs:
                configs[0].scheduler = scheduler


class MeanLoss(Metric):
    """The loss averaged over a split's images, on one rank or many: the sums of loss × batch size and of
    batch sizes, added up across ranks as floats.

    Hand-written because neither library's mean fits: Lightning's ``sync_dist`` mean floors the summed batch
    sizes when DDP ranks hold unequal shards, inflating the loss (Lightning-AI/pytorch-lightning#21859), and
    torchmetrics' ``MeanMetric`` either reads each batch back to the host to look for NaNs or, with that
    check disabled, ignores the weights (torchmetrics 1.9).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("images", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, images: int) -> None:
        self.total += loss.detach().float() * images
        self.images += images

    def compute(self) -> torch.Tensor:
        return self.total / self.images


def _accuracy(num_classes: int, top_k: int) -> MulticlassAccuracy:
    # validate_args=False: the argument checks read tensors back to the host on every update
    return MulticlassAccuracy(num_classes, top_k=top_k, average="micro", validate_args=False)


def _batch_mixer(cfg: dict[str, Any], num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on whole batches (torchvision's), or None when both alphas are 0."""
    mixers: list[v2.Transform] = []
    if cfg["mixup_alpha"] > 0:
        mixers.append(v2.MixUp(alpha=cfg["mixup_alpha"], num_classes=num_classes))
    if cfg["cutmix_alpha"] > 0:
        mixers.append(v2.CutMix(alpha=cfg["cutmix_alpha"], num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class StepGraph:
    """One training step's forward, loss and backward, captured once as a CUDA graph and then replayed.

    Each replay reads the batch from the same input tensors and writes the loss, the logits and every
    parameter's gradient into the same memory as the last one. The optimizer steps outside the graph
    (a fused or foreach step is a few launches) and finds the gradients where it always does, so the
    learning-rate schedule, gradient clipping and the NaN guard work as in eager steps.
    """

    def __init__(
        self,
        loss_of: Callable[[torch.Tensor, torch.Tensor], LossAndLogits],
        params: list[torch.nn.Parameter],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        self.x, self.y = x.clone(), y.clone()
        for p in params:
            p.grad = None  # so that backward allocates them in the graph's memory pool
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the telemetry thread may use CUDA meanwhile; only this thread's work is captured
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss, self.logits = loss_of(self.x, self.y)
            self.loss.backward()

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether a batch can be replayed: the captured shapes and dtypes."""
        return (x.shape, x.dtype, y.shape, y.dtype) == (
            self.x.shape,
            self.x.dtype,
            self.y.shape,
            self.y.dtype,
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> LossAndLogits:
        """Run the step on this batch: the loss and logits (overwritten by the next replay)."""
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss.detach(), self.logits
