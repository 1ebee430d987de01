"""The recipe's schema: one frozen dataclass per section, each field with its default, type and metadata.

The field metadata is the single source of truth for what a recipe may hold: ``doc`` (one line for
people and the generated reference), ``lo``/``hi`` with ``lo_open``/``hi_open`` (the allowed range),
``input: False`` (how a stage runs, not what it is made from: left out of fingerprints) and
``omit_default`` (a key added after run directories existed: at its default it is left out of the
fingerprint). :data:`CODE_KEYS` lists the values that can name code to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

__all__ = [
    "Recipe",
    "RunSection",
    "DataSection",
    "TrainSettings",
    "TeacherSection",
    "StudentSection",
    "DistillSection",
    "FeatureTerm",
    "PruneSection",
    "BudgetSection",
    "TeacherCacheSection",
    "BUDGET_KINDS",
    "ReportSection",
    "ExportSection",
    "CODE_KEYS",
    "IMAGEFOLDER_KEYS",
    "pruning_steps_needed",
]


def _range(lo=None, hi=None, lo_open=False, hi_open=False, doc=""):
    """Field metadata: an allowed numeric range and a one-line description."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc}


def _doc(text):
    return {"doc": text}


@dataclass(frozen=True)
class RunSection:
    name: str = field(
        default="quickstart",
        metadata=_doc("run directory name: <out_dir>/<name>; default: the recipe file's name without .yaml"),
    )
    seed: int = field(default=0, metadata=_range(lo=0, doc="seed for weights, shuffling and splits"))
    # not an input of any stage: each seed is a run directory of its own, made with run.seed set to it
    seeds: list[int] = field(
        default_factory=list,
        metadata=_doc(
            "several seeds, e.g. [0, 1, 2] (kdc run --seeds 3): the teacher is trained once (with the first seed), "
            "every other stage once per seed; the first seed's run is this run directory, seed s's is "
            "<run dir>/seeds/seed-s; the report gives each stage's mean and std over the seeds"
        ),
    )
    device: str = field(default="auto", metadata=_doc("auto, cpu, cuda or cuda:N"))
    out_dir: str = field(default="runs", metadata=_doc("folder that holds run directories"))
    threads: Optional[int] = field(default=None, metadata=_range(lo=1, doc="CPU threads (default: all cores)"))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=_doc("bf16 autocast on CUDA (fp32 on CPU)"))
    channels_last: bool = field(default=False, metadata=_doc("channels-last memory format on CUDA"))
    compile: bool = field(default=False, metadata=_doc("torch.compile the model being trained"))
    bn_recalibrate: int = field(
        default=0,
        metadata=_range(
            lo=0,
            doc="after training, recompute BatchNorm running statistics from this many training batches (0 = off)",
        ),
    )


@dataclass(frozen=True)
class DataSection:
    dataset: str = field(
        default="fashion-mnist-mini",
        metadata=_doc("fashion-mnist-mini (shipped), fashion-mnist, mnist, imagefolder:PATH or package.module:factory"),
    )
    root: Optional[str] = field(default=None, metadata=_doc("data folder; else $KDC_DATA, else a cache dir"))
    batch_size: int = field(default=128, metadata=_range(lo=1, doc="training batch size"))
    eval_batch_size: int = field(default=1000, metadata=_range(lo=1, doc="evaluation batch size"))
    val_split: float = field(
        default=0.0,
        metadata=_range(lo=0.0, hi=1.0, hi_open=True, doc="share of training data held out for validation"),
    )
    crop_padding: int = field(default=0, metadata=_range(lo=0, doc="augment: random crop after zero padding (pixels)"))
    hflip: bool = field(default=False, metadata=_doc("augment: random horizontal flip"))
    # The keys below came after run directories existed: "omit_default" keeps the built-in sets' fingerprints;
    # an imagefolder run counts them always (kdcompress.run.stages), as they changed what its models are fed.
    channels: Union[Literal["auto"], Literal[1, 3]] = field(
        default="auto",
        metadata={
            **_doc(
                "imagefolder: channels the models get; auto: 1 when every image's PIL mode is grey (1, L, LA, I, "
                "I;16, F), else 3 (decided from the files' modes, not their pixels: an RGB file of grey pixels "
                "counts as colour)"
            ),
            "omit_default": True,
        },
    )
    image_size: Optional[list[int]] = field(
        default=None,
        metadata={
            **_doc(
                "imagefolder: [height, width] every image is brought to (see data.resize); null: the images' own "
                "size, and a folder of mixed sizes is refused"
            ),
            "omit_default": True,
        },
    )
    resize: Literal["resize", "center-crop", "pad"] = field(
        default="resize",
        metadata={
            **_doc(
                "imagefolder, with data.image_size: how an image of another size is brought to it: resize "
                "(stretched, bilinear), center-crop (scaled to cover, then the middle cut out) or pad (scaled to "
                "fit, then black borders)"
            ),
            "omit_default": True,
        },
    )
    normalize: Union[Literal["measured", "imagenet", "none"], dict] = field(
        default="measured",
        metadata={
            **_doc(
                "imagefolder: per-channel mean and std the models' input is (x / 255 - mean) / std with: measured "
                "(from the training split's images, once per run), imagenet, none (mean 0, std 1) or "
                "{mean: [...], std: [...]} (one value per channel, in 0-1 units); every checkpoint records them"
            ),
            "omit_default": True,
        },
    )
    # input: False -- how batches are read, not what they hold: changing it retrains no stage
    workers: int = field(
        default=2,
        metadata={
            **_range(lo=0, doc="imagefolder: decoding processes; your own datasets: DataLoader workers"),
            "input": False,
        },
    )


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule settings shared by every training stage."""

    epochs: int = field(default=5, metadata=_range(lo=0, doc="epochs of training"))
    optimizer: Literal["sgd", "adam", "adamw"] = field(default="sgd", metadata=_doc("sgd, adam or adamw"))
    lr: float = field(default=0.05, metadata=_range(lo=0.0, lo_open=True, doc="learning rate"))
    momentum: float = field(default=0.9, metadata=_range(lo=0.0, hi=1.0, hi_open=True, doc="SGD momentum"))
    weight_decay: float = field(default=0.0, metadata=_range(lo=0.0, doc="L2 weight decay"))
    schedule: Literal["constant", "step", "cosine"] = field(
        default="cosine", metadata=_doc("learning-rate schedule: constant, step or cosine")
    )
    step_size: int = field(default=10, metadata=_range(lo=1, doc="epochs between decays (schedule: step)"))
    gamma: float = field(
        default=0.1, metadata=_range(lo=0.0, hi=1.0, lo_open=True, doc="decay factor (schedule: step)")
    )


@dataclass(frozen=True)
class TeacherSection(TrainSettings):
    model: str = field(default="cnn", metadata=_doc("mlp, cnn, lenet5, torchvision:NAME or package.module:factory"))
    args: dict = field(default_factory=dict, metadata=_doc("keyword arguments for the model factory"))
    epochs: int = field(default=8, metadata=_range(lo=0, doc="epochs of training"))
    # input: False -- the file's content is what the teacher is made from (the teacher stage's inputs hold its
    # SHA-256, teacher.checkpoint_sha256), not where it lies
    checkpoint: Optional[str] = field(
        default=None,
        metadata={
            **_doc(
                "your own trained teacher, not trained again: a state_dict file (torch.save(model.state_dict())) "
                "of teacher.model/args, or a kdc checkpoint (<run dir>/teacher/model.pt); a relative path is "
                "looked up in the current directory, then in the recipe's folder"
            ),
            "input": False,
        },
    )
    pretrained: bool = field(
        default=False,
        metadata=_doc(
            "torchvision:NAME teachers: start from torchvision's ImageNet weights, read from the local torch hub "
            "cache (never downloaded); a new classifier head when the data has other than 1000 classes"
        ),
    )
    # omit_default: added after run directories existed; at null the teacher keeps the fingerprint it had
    seed: Optional[int] = field(
        default=None,
        metadata={
            **_range(
                lo=0,
                doc="the teacher's own seed (default: run.seed); kdc run --seeds pins it to the first seed, "
                "so that every seed distils from the one teacher",
            ),
            "omit_default": True,
        },
    )


@dataclass(frozen=True)
class StudentSection:
    model: str = field(default="mlp", metadata=_doc("mlp, cnn, lenet5, torchvision:NAME or package.module:factory"))
    # No default arguments here: each model has its own (the MLP's hidden=(100,)), and another model's would break it
    args: dict = field(default_factory=dict, metadata=_doc("keyword arguments for the model factory"))
    baseline: bool = field(
        default=True,
        metadata=_doc("also train the student alone with cross-entropy (the 'student' row), with the distill settings"),
    )


@dataclass(frozen=True)
class FeatureTerm:
    """One ``distill.features`` term: a student module's output matched to a teacher module's output."""

    teacher: str = field(default="", metadata=_doc("the teacher module's dotted path (model.named_modules())"))
    student: str = field(default="", metadata=_doc("the student module's dotted path (model.named_modules())"))
    loss: Literal["hint", "at"] = field(
        default="hint",
        metadata=_doc(
            "hint (FitNets: MSE through a trainable 1x1 conv or linear adapter) or at (attention transfer: "
            "feature maps of the same height and width)"
        ),
    )
    weight: float = field(default=1.0, metadata=_range(lo=0.0, lo_open=True, doc="weight of this term in the loss"))


@dataclass(frozen=True)
class TeacherCacheSection:
    """``distill.teacher_cache``: the teacher's logits stored per augmented view (FKD), so it never runs in training."""

    views: int = field(
        default=0,
        metadata=_range(
            lo=0,
            doc="augmented views stored per training image (K teacher passes, once); each epoch shows every image "
            "one of them, the same one to the student and in the teacher's targets; 0: the teacher runs online",
        ),
    )
    dtype: Literal["float16", "float32"] = field(
        default="float16", metadata=_doc("how the stored logits are kept: float16 (half the size) or float32")
    )


@dataclass(frozen=True)
class DistillSection(TrainSettings):
    temperature: float = field(default=4.0, metadata=_range(lo=0.0, lo_open=True, doc="softmax temperature T"))
    alpha: float = field(
        default=0.5,
        metadata=_range(lo=0.0, hi=1.0, doc="kd: weight of the soft (teacher) term (1 - alpha: cross-entropy)"),
    )
    # The keys below came after run directories existed: "omit_default" leaves a key at its default out of the
    # stage fingerprints, so adding them made no existing distilled or pruned stage out of date.
    loss: str = field(
        default="kd",
        metadata={
            **_doc("kd (Hinton), dkd (decoupled KD, Zhao et al. 2022) or package.module:function for your own"),
            "omit_default": True,
        },
    )
    dkd_alpha: float = field(
        default=1.0,
        metadata={**_range(lo=0.0, doc="dkd: weight of TCKD (target vs other classes)"), "omit_default": True},
    )
    dkd_beta: float = field(
        default=8.0,
        metadata={**_range(lo=0.0, doc="dkd: weight of NCKD (among the other classes)"), "omit_default": True},
    )
    dkd_warmup: int = field(
        default=20,
        metadata={
            **_range(
                lo=0,
                doc="dkd: epochs over which the DKD term rises linearly to full weight (at most the "
                "distill epochs; 0: none)",
            ),
            "omit_default": True,
        },
    )
    loss_args: dict = field(
        default_factory=dict,
        metadata={
            **_doc("your own loss: the args dict it is called with, fn(student_logits, teacher_logits, targets, args)"),
            "omit_default": True,
        },
    )
    features: list[FeatureTerm] = field(
        default_factory=list,
        metadata={
            **_doc(
                "feature terms added to the distilled stage's loss: a list of {teacher: module path, "
                "student: module path, loss: hint | at, weight: w}; the teacher then runs online"
            ),
            "omit_default": True,
        },
    )
    teacher_cache: TeacherCacheSection = field(
        default_factory=TeacherCacheSection,
        metadata={
            **_doc(
                "with data augmentation: {views: K} runs the teacher once per stored view before training "
                "instead of on every batch (an epoch then costs about what a cross-entropy epoch does)"
            ),
            "omit_default": True,
        },
    )


@dataclass(frozen=True)
class BudgetSection:
    """``prune.budget``: what the pruned model may cost; set exactly one of macs, params, bytes, latency_ms, latency."""

    macs: Optional[float] = field(
        default=None,
        metadata=_range(
            lo=0.0,
            lo_open=True,
            doc="multiply-accumulates per image: at most 1 is a fraction of the distilled student's, more is a count",
        ),
    )
    params: Optional[float] = field(
        default=None,
        metadata=_range(
            lo=0.0, lo_open=True, doc="parameters: at most 1 is a fraction of the distilled student's, more is a count"
        ),
    )
    bytes: Optional[float] = field(
        default=None,
        metadata=_range(
            lo=0.0,
            lo_open=True,
            doc="size of the exported file (budget.format): at most 1 is a fraction of the distilled student's "
            "file, more is a count of bytes",
        ),
    )
    latency_ms: Optional[float] = field(
        default=None,
        metadata=_range(lo=0.0, lo_open=True, doc="milliseconds per batch of budget.batch on budget.runtime"),
    )
    latency: Optional[float] = field(
        default=None,
        metadata=_range(
            lo=0.0, lo_open=True, hi=1.0, doc="latency as a fraction of the distilled student's, on budget.runtime"
        ),
    )
    batch: int = field(default=64, metadata=_range(lo=1, doc="latency budgets: the batch size timed"))
    runtime: Literal["onnxruntime", "torch"] = field(
        default="onnxruntime",
        metadata=_doc("latency budgets: where the model is timed, onnxruntime (the exported ONNX) or torch"),
    )
    format: Literal["onnx", "int8"] = field(
        default="onnx", metadata=_doc("bytes budgets: the export format whose file is measured")
    )

    def kind(self) -> Optional[str]:
        """The one budget set (macs, params, bytes, latency_ms or latency), or None."""
        kinds = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        return kinds[0] if len(kinds) == 1 else None

    def is_set(self) -> bool:
        return any(getattr(self, k) is not None for k in BUDGET_KINDS)


BUDGET_KINDS = ("macs", "params", "bytes", "latency_ms", "latency")


@dataclass(frozen=True)
class PruneSection(TrainSettings):
    rate: float = field(
        default=0.3,
        metadata=_range(
            lo=0.0,
            hi=1.0,
            lo_open=True,
            hi_open=True,
            doc="fraction of still-non-zero prunable weights removed per step (schedule: iterative; channels when "
            "structured)",
        ),
    )
    target_sparsity: float = field(
        default=0.9,
        metadata=_range(
            lo=0.0,
            hi=1.0,
            hi_open=True,
            doc="fraction of all prunable weights that end at zero (channels when structured)",
        ),
    )
    # Not 'schedule': every training section's 'schedule' is its learning-rate schedule (prune.schedule: cosine)
    sparsity_schedule: Literal["iterative", "agp", "one-shot"] = field(
        default="iterative",
        metadata=_doc(
            "how sparsity rises: iterative (rate of what is left per step), agp (Zhu & Gupta's cubic ramp) or "
            "one-shot (all at the first batch)"
        ),
    )
    every: Union[Literal["auto"], float] = field(
        default="auto",
        metadata=_range(
            lo=0.0,
            lo_open=True,
            doc="auto (the steps spread evenly over the first two thirds of retraining) or epochs between steps",
        ),
    )
    steps: Union[Literal["auto"], int] = field(
        default="auto",
        metadata=_range(lo=1, doc="agp: pruning steps after the start (auto: as many as iterative takes at rate)"),
    )
    initial_sparsity: float = field(
        default=0.0,
        metadata=_range(lo=0.0, hi=1.0, hi_open=True, doc="agp: sparsity at the first step (s_i)"),
    )
    method: Literal["unstructured", "structured"] = field(
        default="unstructured",
        metadata=_doc(
            "unstructured: zero single weights (masks); structured: remove whole conv channels and linear neurons, "
            "so the model gets smaller and faster (rate and target_sparsity then count channels)"
        ),
    )
    importance: Literal["l1", "l2", "bn_scale"] = field(
        default="l1",
        metadata=_doc("structured: which channels go first; l1 or l2 norm of the channel's group, or BatchNorm scale"),
    )
    scope: Literal["global", "layer"] = field(default="global", metadata=_doc("rank weights globally or per layer"))
    include: list[str] = field(default_factory=lambda: ["*"], metadata=_doc("module-name patterns to prune"))
    exclude: list[str] = field(default_factory=list, metadata=_doc("module-name patterns to leave dense"))
    distill: bool = field(default=True, metadata=_doc("retrain with the distillation loss (else cross-entropy)"))
    epochs: int = field(default=8, metadata=_range(lo=0, doc="epochs of retraining"))
    lr: float = field(default=0.01, metadata=_range(lo=0.0, lo_open=True, doc="learning rate"))
    # The keys below came after run directories existed: "omit_default" keeps the pruned stage's fingerprint
    budget: BudgetSection = field(
        default_factory=BudgetSection,
        metadata={
            **_doc(
                "structured: a target instead of target_sparsity, e.g. {macs: 0.25} or {latency_ms: 2, batch: 64}; "
                "the per-layer ratios that meet it are chosen before retraining"
            ),
            "omit_default": True,
        },
    )
    allocation: Literal["uniform", "sensitivity"] = field(
        default="uniform",
        metadata={
            **_doc(
                "with a budget: uniform (one share of every layer) or sensitivity (per-layer shares chosen from "
                "each layer's measured accuracy drop, the least damaging first)"
            ),
            "omit_default": True,
        },
    )
    round_to: Optional[int] = field(
        default=None,
        metadata={
            **_range(lo=1, doc="structured: every pruned layer keeps a multiple of this many channels (e.g. 8)"),
            "omit_default": True,
        },
    )
    sensitivity_ratios: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        metadata={
            **_doc(
                "kdc sensitivity and allocation: sensitivity: the shares of each layer pruned alone, each in (0, 1)"
            ),
            "omit_default": True,
        },
    )
    sensitivity_bn_batches: int = field(
        default=20,
        metadata={
            **_range(
                lo=0,
                doc="kdc sensitivity: training batches that recompute BatchNorm's statistics of each pruned copy "
                "before it is scored (adaptive BN, as EagleEye; 0: scored as pruned)",
            ),
            "omit_default": True,
        },
    )
    sensitivity_samples: int = field(
        default=2000,
        metadata={
            **_range(
                lo=1, doc="kdc sensitivity and allocation: sensitivity: validation images each ratio is scored on"
            ),
            "omit_default": True,
        },
    )


@dataclass(frozen=True)
class ReportSection:
    latency: bool = field(default=True, metadata=_doc("measure CPU inference latency for each stage"))
    latency_batches: list[int] = field(
        default_factory=lambda: [1, 64], metadata=_doc("batch sizes for the latency measurement, each >= 1")
    )
    threads: int = field(
        default=2,
        metadata=_range(lo=1, doc="CPU threads for the latency measurement (fewer if the machine has fewer cores)"),
    )
    # Kept so that recipes and run directories written before latency_batches still load: a value here
    # measures that one batch size, as it did then.
    latency_batch: Optional[int] = field(
        default=None, metadata=_range(lo=1, doc="deprecated: one batch size; use latency_batches")
    )
    # omit_default: added after run directories existed. No stage reads this section today; marked like the
    # other late keys so that a stage that ever comes to read it keeps its fingerprint while it is false.
    tensorboard: bool = field(
        default=False,
        metadata={
            **_doc(
                "also write TensorBoard scalars every epoch to <run dir>/tensorboard/<stage>/ (needs "
                "`pip install tensorboard`)"
            ),
            "omit_default": True,
        },
    )


@dataclass(frozen=True)
class ExportSection:
    formats: list[Literal["sparse", "shared", "int8", "onnx"]] = field(
        default_factory=list,
        metadata=_doc("artifacts `kdc run` writes to <run dir>/export/: sparse, shared, int8, onnx (none: no export)"),
    )
    stage: Literal["teacher", "student", "distilled", "pruned"] = field(
        default="pruned", metadata=_doc("the stage whose model is exported")
    )
    dtype: Literal["fp16", "fp32"] = field(
        default="fp16", metadata=_doc("sparse: precision of the stored non-zeros (fp32 round-trips bit for bit)")
    )
    codec: Literal["lzma", "zlib"] = field(default="lzma", metadata=_doc("sparse, shared: entropy coder of the file"))
    bits: int = field(default=4, metadata=_range(lo=2, hi=8, doc="shared: bits per weight index (2**bits centroids)"))
    calibration_batches: int = field(
        default=8, metadata=_range(lo=1, doc="int8: training batches that calibrate the activation ranges")
    )
    int8_tolerance: Optional[float] = field(
        default=None,
        metadata=_range(
            lo=0.0,
            doc="int8: accuracy points the int8 file may lose against its fp32 ONNX on the validation split; beyond "
            "it the most damaging nodes stay in fp32 (null: no check)",
        ),
    )


@dataclass(frozen=True)
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    prune: PruneSection = field(default_factory=PruneSection)
    report: ReportSection = field(default_factory=ReportSection)
    export: ExportSection = field(default_factory=ExportSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# The recipe values that can name code to import (package.module:name), each with the NAME: forms that are not
# import paths. kdc imports them for a recipe the user gave; a run directory's recipe.yaml only when trusted.
CODE_KEYS: dict[str, tuple[str, ...]] = {
    "teacher.model": ("torchvision",),
    "student.model": ("torchvision",),
    "data.dataset": ("imagefolder",),
    "distill.loss": (),
}


# The data keys that say how an image folder's files become inputs: only imagefolder:PATH reads them.
IMAGEFOLDER_KEYS = ("channels", "image_size", "resize", "normalize")


def pruning_steps_needed(rate: float, target: float) -> int:
    """Number of steps that each remove ``rate`` of what is left, to reach ``target`` sparsity."""
    if target <= 0:
        return 0
    # kept after n steps is (1 - rate)^n; the last step is trimmed to land exactly on the target.
    exact = math.log1p(-target) / math.log1p(-rate)
    return max(1, math.ceil(exact - 1e-9)) if math.isfinite(exact) else 10**18
