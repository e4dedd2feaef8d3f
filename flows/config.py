"""The flows' parameters: one frozen pydantic model per flow, validated before any work."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from common.errors import UserError
from common.path_settings import OptionalPathText, PathSetting, PathText, resolve_path
from flows.source_settings import flatten, lift, source_union
from tasks.data.images import DEFAULT_MAX_PIXELS
from tasks.data.sources import MEMORY_SOURCES, SOURCES, FashionMnistSource

ModelName = Literal[
    "mlp", "cnn", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"
]
BACKBONES = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")
WEIGHTS = PathSetting(names=("none", "imagenet"))  # --weights: a name, or a state_dict file
RunnerName = Literal["threads", "processes", "dask", "ray"]
_HOST_PORT = r"[^\s:/]+:\d+"
_ADDRESSES = {  # runner: (accepted address, as said in errors)
    "dask": (rf"(tcp|tls)://{_HOST_PORT}", "tcp://HOST:PORT or tls://HOST:PORT"),
    "ray": (rf"ray://{_HOST_PORT}|{_HOST_PORT}|auto", "ray://HOST:PORT, HOST:PORT (the head's GCS) or auto"),
}
NAME_LIMIT = 256  # characters in an experiment or registered name
ONNX_SUFFIX = "-onnx"  # the ONNX flavor's registered name is the PyTorch flavor's plus this
_NAME_FORBIDDEN = "'\"/\\"  # names end up in MLflow filter strings, paths and URLs


def check_name(value: str, limit: int = NAME_LIMIT, why: str = "") -> str:
    """An MLflow experiment or registered-model name: printable, no quotes or slashes, at most `limit`
    characters."""
    if len(value) > limit:
        raise ValueError(f"{len(value)} characters; a name takes at most {limit}{why}")
    bad = sorted({c for c in value if c in _NAME_FORBIDDEN or not c.isprintable()})
    if bad:
        raise ValueError(
            f"contains {', '.join(map(repr, bad))}; a name takes printable characters other than "
            "quotes (' \"), slashes (/ \\) and control characters"
        )
    return value


class BatchSplitError(UserError, ValueError):
    """--batch-size (the global batch) does not split evenly over the processes."""


def check_batch(batch_size: int, world: int) -> None:
    """--batch-size is the global batch: it must split evenly over `world` processes."""
    if batch_size % world:
        below = batch_size - batch_size % world
        valid = " or ".join(str(size) for size in (below, below + world) if size > 0)
        raise BatchSplitError(
            f"--batch-size {batch_size} does not divide over --devices {world}; the nearest that do: "
            f"{valid}"
        )


def check_devices(value: str) -> str:
    """--devices: a number of processes from 1, or auto."""
    if value != "auto" and not (value.isdigit() and 1 <= int(value) <= 4096):
        raise ValueError(f"--devices {value!r}: give a number of processes from 1 to 4096, or auto")
    return value


def check_registered_name(value: str) -> str:
    """A registered-model name that leaves room for the ONNX flavor's suffix and is not itself an
    ONNX flavor's name (its versions would land in another model's ONNX line)."""
    if value.endswith(ONNX_SUFFIX):
        base = value.removesuffix(ONNX_SUFFIX)
        raise ValueError(
            f"{value!r} ends in {ONNX_SUFFIX!r}, which names the ONNX flavor of {base!r}; give the "
            f"PyTorch flavor's name (the ONNX one is it plus {ONNX_SUFFIX!r}), or another name"
        )
    room = f" ({NAME_LIMIT} less the {ONNX_SUFFIX!r} the ONNX flavor's name adds)"
    return check_name(value, NAME_LIMIT - len(ONNX_SUFFIX), room)


ExperimentName = Annotated[str, Field(min_length=1), AfterValidator(check_name)]
RegisteredName = Annotated[str, Field(min_length=1), AfterValidator(check_registered_name)]
TrainSource = source_union(SOURCES)
PredictSource = source_union(MEMORY_SOURCES)  # a test split to predict: the datasets that have one


class TrainConfig(BaseModel):
    """Train, evaluate, export and register an image classifier."""

    # Frozen, so a run cannot drift from the settings it logged.
    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: TrainSource = Field(
        FashionMnistSource(),
        description="Dataset to train on; the flags marked with its name are its settings.",
    )
    data_dir: PathText = Field("data", description="Dataset root; downloads and prepared tensors go here.")
    channels: Literal["auto", "1", "3"] = Field(
        "auto", description="Image channels: auto is 3 when any image has colour, else 1."
    )
    image_size: Optional[str] = Field(
        None,
        pattern=r"^[1-9][0-9]{0,4}(x[1-9][0-9]{0,4})?$",
        description="Model input size, H or HxW; default: the images' own size when they all share one, "
        "else 224 for pretrained backbones and 128 otherwise.",
    )
    resize_mode: Literal["crop", "pad", "stretch"] = Field(
        "crop",
        description="How images of another shape reach --image-size: crop (shorter side, then centre "
        "crop), pad (letterbox in black) or stretch.",
    )
    prepare_workers: Optional[int] = Field(
        None, ge=1, le=1024, description="Processes decoding and resizing images; default: one per core."
    )
    augment: Literal["auto", "none", "flip", "standard"] = Field(
        "auto",
        description="Training augmentation on whole batches: standard is a random resized crop, flip and "
        "colour jitter; auto is the dataset's own: standard for colour photos (csv, folder), else none.",
    )
    model: ModelName = Field(
        "cnn", description="Network: the notes' MLP, a small CNN or a torchvision backbone."
    )
    weights: Annotated[str, WEIGHTS] = Field(
        "none",
        min_length=1,
        description="Backbone weights: none (random), imagenet (torchvision's, from the TORCH_HOME cache "
        "or downloaded) or the path of a state_dict file.",
    )
    freeze_backbone: bool = Field(False, description="Train the new classifier head only.")
    backbone_lr_scale: float = Field(
        0.1, ge=0, le=10, description="The backbone's learning rate as a share of --lr (the head's)."
    )
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the training split.")
    batch_size: int = Field(128, ge=1, le=65536, description="Samples per optimisation step.")
    lr: float = Field(5e-3, gt=0, le=10, description="Peak learning rate.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field(
        "adamw", description="Optimiser (sgd uses Nesterov momentum 0.9)."
    )
    weight_decay: float = Field(1e-4, ge=0, le=1, description="L2 penalty (decoupled for adamw).")
    scheduler: Literal["onecycle", "cosine", "constant"] = Field(
        "onecycle", description="Learning-rate schedule over the whole run."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for the split, initialisation and shuffling.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train: auto picks cuda, then mps, then cpu."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training arithmetic: auto is bf16 autocast where the CPU (AVX512-BF16 or AMX) or "
        "GPU computes bf16 natively, else fp32; fp16 needs CUDA. Saved models are fp32 either way.",
    )
    compile: bool = Field(False, description="torch.compile the training step (pays a warm-up first).")
    threads: Optional[int] = Field(
        None, ge=1, le=1024, description="CPU threads for torch; default: one per physical core."
    )
    devices: Annotated[str, AfterValidator(check_devices)] = Field(
        "1",
        description="Processes that train one model together (DistributedDataParallel): a number, or "
        "auto for every GPU on CUDA. The batch size is the global batch, split between them.",
    )
    train_on: Literal["local", "ray"] = Field(
        "local", description="Train on this machine, or as a Ray Train job on the Ray cluster at address."
    )
    address: Optional[str] = Field(
        None,
        description="The Ray cluster for train_on ray: ray://HOST:PORT, HOST:PORT (the head's GCS) or "
        "auto; default: a local Ray started for the run.",
    )
    sync_batchnorm: bool = Field(
        True,
        description="With several processes, compute batch-norm statistics over the global batch "
        "(torch's SyncBatchNorm, which runs on CUDA only: on CPU each process normalises its share).",
    )
    collective_timeout_seconds: float = Field(
        300,
        ge=10,
        le=86400,
        description="With several processes, a rank that dies or waits longer than this on the others "
        "fails the whole training (then the train step's retry resumes it).",
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the training split held out for validation."
    )
    train_retries: int = Field(
        1,
        ge=0,
        le=10,
        description="Retries of the train step after a failure; each resumes from the last epoch.",
    )
    train_timeout_minutes: Optional[float] = Field(
        None,
        gt=0,
        description="Fail the train step (then retry it) after this many minutes; default: no limit.",
    )
    system_metrics: bool = Field(
        True, description="Record CPU, memory, disk and network (and GPU) use while training in MLflow."
    )
    tracking_patience_minutes: float = Field(
        10,
        gt=0,
        description="How long training goes on while the MLflow tracking server is unreachable (its "
        "metrics are sent when it is back) before the run fails; a retry of the flow run resumes.",
    )
    experiment: ExperimentName = Field("image-classifier", description="MLflow experiment name.")
    registered_model: Optional[RegisteredName] = Field(
        None,
        description="MLflow registry name of the PyTorch flavor (the ONNX flavor gets '-onnx' appended); "
        "default: '<dataset>-<model>'.",
    )
    output_dir: PathText = Field("outputs", description="Per-run local folders go under this folder.")

    @model_validator(mode="before")
    @classmethod
    def _source_settings_under_dataset(cls, values: Any) -> Any:
        return lift(values, "dataset", SOURCES, cls.model_fields["dataset"].default)

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return flatten(handler(self), "dataset")  # dataset: the name; its settings as parameters

    @field_validator("image_size", mode="before")
    @classmethod
    def _size_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value  # 64 from a form or a sweep grid

    @model_validator(mode="after")
    def _weights_fit_model(self) -> "TrainConfig":
        if self.model not in BACKBONES and (self.weights != "none" or self.freeze_backbone):
            raise ValueError(
                f"--weights and --freeze-backbone apply only to the backbones ({', '.join(BACKBONES)}), "
                f"not --model {self.model}"
            )
        if self.freeze_backbone and self.weights == "none":
            raise ValueError("--freeze-backbone needs pretrained --weights (imagenet or a file)")
        if self.weights not in WEIGHTS.names and not resolve_path(self.weights).is_file():
            raise ValueError(
                f"--weights {self.weights!r}: no such file; give none, imagenet or a state_dict file"
            )
        return self

    @model_validator(mode="after")
    def _devices_fit_batch(self) -> "TrainConfig":
        if self.devices != "auto":
            check_batch(self.batch_size, int(self.devices))
        if self.address and self.train_on != "ray":
            raise ValueError(f"--address {self.address!r} is for --train-on ray (this run trains local)")
        if self.address and not re.fullmatch(_ADDRESSES["ray"][0], self.address):
            raise ValueError(f"--address {self.address!r}: give {_ADDRESSES['ray'][1]}")
        return self

    @property
    def input_size(self) -> Optional[tuple[int, int]]:
        """--image-size as (height, width), or None for the default."""
        if not self.image_size:
            return None
        height, _, width = self.image_size.partition("x")
        return int(height), int(width or height)

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"

    @property
    def model_name(self) -> str:
        """Registry name of the PyTorch flavor."""
        return self.registered_model or f"{self.dataset.name}-{self.model}"


class ClusterOptions(BaseModel):
    """Where a flow's parallel tasks run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_runner: RunnerName = Field(
        "threads", description="Prefect's thread or process pool, or a Dask or Ray cluster."
    )
    address: Optional[str] = Field(
        None,
        description="An existing cluster: a Dask scheduler (tcp://HOST:PORT) or Ray (ray://HOST:PORT, "
        "the head's HOST:PORT, or auto); default for dask and ray: start a local cluster and stop it at "
        "the end.",
    )
    max_parallel: Optional[int] = Field(
        None, ge=1, le=4096, description="Tasks running at once; default: what the runner offers."
    )

    @model_validator(mode="after")
    def _address_fits_runner(self) -> "ClusterOptions":
        if self.address is None:
            return self
        if self.task_runner not in _ADDRESSES:
            raise ValueError(f"--address applies only to --task-runner dask or ray, not {self.task_runner!r}")
        pattern, accepted = _ADDRESSES[self.task_runner]
        if not re.fullmatch(pattern, self.address):
            raise ValueError(f"--address {self.address!r}: --task-runner {self.task_runner} takes {accepted}")
        return self


class PredictConfig(ClusterOptions):
    """Predict images with a model from the MLflow registry and write a predictions CSV."""

    registered_model: RegisteredName = Field(
        ..., description="Registry name of the model, as trained (e.g. 'digits-cnn')."
    )
    alias: str = Field("champion", min_length=1, description="Registry alias of the version to use.")
    # A string: a deployment trigger's template renders the event's version as one, and the server
    # checks parameters against this schema before the flow sees them.
    version: Optional[str] = Field(
        None,
        pattern=r"^[1-9][0-9]{0,9}$",
        description="Use this version of --registered-model instead of --alias (the number the promotion "
        "gate and its event give; with --flavor onnx, the ONNX version the same training run registered).",
    )
    trigger_event: Optional[str] = Field(
        None,
        pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$",
        description="Id of the Prefect event that started this run (a deployment trigger sets it); "
        "recorded with the run.",
    )
    flavor: Literal["onnx", "pytorch"] = Field(
        "onnx",
        description="Run the ONNX flavor (onnxruntime) or the PyTorch flavor ('<name>' vs '<name>-onnx').",
    )
    input_csv: OptionalPathText = Field(
        None, description="CSV of images: path relative to --image-root, then an optional label."
    )
    image_root: OptionalPathText = Field(
        None, description="Folder the CSV paths are relative to; default: the CSV's."
    )
    image_dir: OptionalPathText = Field(None, description="Predict every image file in this folder.")
    dataset: Optional[PredictSource] = Field(
        None, description="Predict the test split of this dataset (labels known), with its own settings."
    )
    data_dir: PathText = Field("data", description="Dataset root for --dataset.")
    batch_size: int = Field(512, ge=1, le=65536, description="Images per inference batch.")
    partition_size: int = Field(
        10000, ge=1, description="Images per partition, the unit of work a task runner hands out."
    )
    output: OptionalPathText = Field(
        None, description="Predictions CSV to write; default: predictions.csv in the run's folder."
    )
    output_dir: PathText = Field("outputs", description="Per-run local folders go under this folder.")
    experiment: ExperimentName = Field("image-classifier-predictions", description="MLflow experiment name.")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Refuse an image whose header declares more pixels than this, before decoding it.",
    )
    resize: bool = Field(
        True,
        description="Bring images of another size than the model's input to it as training did (the "
        "preprocessing stored with the model); --no-resize refuses them instead.",
    )

    @model_validator(mode="before")
    @classmethod
    def _source_settings_under_dataset(cls, values: Any) -> Any:
        return lift(values, "dataset", MEMORY_SOURCES, None)

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return flatten(handler(self), "dataset")

    @model_validator(mode="after")
    def _one_input(self) -> "PredictConfig":
        given = [flag for flag, value in _input_flags(self) if value]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of --input-csv, --image-dir, --dataset (got {given or 'none'})"
            )
        if self.image_root and not self.input_csv:
            raise ValueError("--image-root applies only to --input-csv")
        if self.version and self.alias != "champion":  # a form may send the default alias with a version
            raise ValueError(f"give --alias or --version, not both (got {self.alias!r} and {self.version})")
        return self

    @property
    def registry_name(self) -> str:
        """The registered name of the chosen flavor."""
        return self.registered_model + (ONNX_SUFFIX if self.flavor == "onnx" else "")


def _input_flags(config: PredictConfig) -> list[tuple[str, object]]:
    return [
        ("--input-csv", config.input_csv),
        ("--image-dir", config.image_dir),
        ("--dataset", config.dataset),
    ]
