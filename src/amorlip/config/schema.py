"""The config schema: one dataclass per core section, each checking its own values in `validate()` (pure: no
torch, no machine state; rules across sections are in `amorlip.config.validation`). The field docstrings are the
`--help` texts (jsonargparse reads them); the choices of a field come from its `Literal` type.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Literal, get_args

from amorlip.batching import split_batch
from amorlip.config.checks import at_least, check_choice, flag_of, positive
from amorlip.data.sources import DEFAULT_SOURCE, SOURCES, SourceName
from amorlip.errors import ConfigError
from amorlip.model_options import Interpolation, ResizeMode

Precision = Literal["fp32", "bf16", "fp16", "amp_bf16", "pure_bf16"]
LrTemperatureSchedule = Literal["const", "same-as-lr"]
LrScheduler = Literal["cosine", "const", "const-cooldown"]
Scheme = Literal["auto", "plain", "rescaled"]
Device = Literal["auto", "cpu", "cuda"]
SaveFinal = Literal["full", "weights"]

NAME_MAX = 255
"""The longest file or folder name (bytes) of common file systems (ext4, XFS, APFS, NTFS)."""


@dataclass
class ModelConfig:
    """The model: an open_clip config, its precision, compilation."""

    name: str = "tiny-vit"
    """Any open_clip model config name (RN50, ViT-B-32, ...), a registered tiny config, or hf-hub:ORG/REPO from the local Hugging Face cache (never downloaded; its weights are loaded)."""
    precision: Precision = "fp32"
    """fp32 | bf16 = amp_bf16 (bf16 autocast, fp32 weights; CUDA or CPU) | fp16 (autocast + grad scaler, CUDA only) | pure_bf16 (bf16 weights and optimizer state, no autocast). open_clip's amp = fp16 and amp_bfloat16 = bf16 are accepted; its pure_fp16 is refused (no loss scaler)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    pretrained: str | None = None
    """Initial weights: an open_clip checkpoint or state dict (.pt), an `amorlip export` folder or .pt, or an open_clip pretrained tag already in the local cache (never downloaded); not re-loaded on resume."""
    lock_image: bool = False
    """LiT: freeze the image tower (open_clip's lock_image_tower); frozen parameters get no optimizer state."""
    lock_image_unlocked_groups: int = 0
    """lock_image: leave this many last layer groups of the image tower trainable (0 = all frozen)."""
    lock_image_freeze_bn_stats: bool = False
    """lock_image: also freeze batch-norm statistics (ResNet and timm towers)."""
    lock_text: bool = False
    """Freeze the text tower (open_clip's lock_text_tower); frozen parameters get no optimizer state."""
    lock_text_unlocked_layers: int = 0
    """lock_text: leave this many last layer groups of the text tower trainable (0 = all frozen)."""
    lock_text_freeze_layer_norm: bool = True
    """lock_text: freeze the layer norms too (false only for Hugging Face text towers)."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass (open_clip's set_grad_checkpointing): less memory, more time."""
    force_quick_gelu: bool = False
    """Use QuickGELU activations (as OpenAI's models do; open_clip's --force-quick-gelu); true wins over a pretrained tag's setting."""
    force_image_size: int | None = None
    """Image side in pixels instead of the model config's (positional embeddings and transforms follow; RECLIP's last phase must use it); None = the config's."""
    force_patch_dropout: float | None = None
    """FLIP (a resource-efficient method): drop this fraction of the image patches in training only, in [0, 1); evaluation sees all patches. ViT image towers; None = the config's (usually none)."""
    image_mean: list[float] | None = None
    """Per-channel normalisation mean, 3 values, e.g. [0.5,0.5,0.5]; None = the pretrained tag's, else OpenAI's. A value given wins over the tag's."""
    image_std: list[float] | None = None
    """Per-channel normalisation std, 3 values, e.g. [0.5,0.5,0.5]; None = the pretrained tag's, else OpenAI's. A value given wins over the tag's."""
    image_interpolation: Interpolation | None = None
    """Resize interpolation of the evaluation transform (bicubic | bilinear | random); None = the tag's, else bicubic. A value given wins over the tag's."""
    image_resize_mode: ResizeMode | None = None
    """How the evaluation transform fits images: shortest (resize, center crop) | longest (resize, pad) | squash; None = the tag's, else shortest. A value given wins over the tag's."""

    def validate(self) -> None:
        """A precision, a known model config, lock options this model can take, forcing options in range."""
        from amorlip.hf_cache import check_hf_hub, is_hf_hub
        from amorlip.model_catalog import check_lock_options, model_names, tower_kinds
        from amorlip.model_options import check_model_options

        check_choice(self.precision, get_args(Precision), "model.precision")
        check_model_options(self)
        names = [self.name] if is_hf_hub(self.name) and check_hf_hub(self.name) else model_names()
        if self.name not in names:
            close = difflib.get_close_matches(self.name, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"model.name={self.name!r} is not a known model config ({hint}`amorlip models` lists them, "
                "e.g. tiny-vit, RN50, ViT-B-32)"
            )
        check_lock_options(self)
        if self.force_patch_dropout and tower_kinds(self.name)[0] != "vit":
            raise ConfigError(f"model.force_patch_dropout={self.force_patch_dropout}: {self.name}'s image tower is "
                              "not a ViT; patch dropout (FLIP) drops ViT patch tokens (drop --model.force-patch-dropout)")

@dataclass
class DataConfig:
    """Training and evaluation data."""

    source: SourceName = DEFAULT_SOURCE
    """synthetic | csv | wds | fashion-mnist. open_clip's webdataset = wds, and auto (also implied by a train_path given without a source) infers csv or wds from train_path's name."""
    train_path: str | None = None
    """CSV file, or webdataset shard pattern (brace notation, `::` joins several), or a shard directory."""
    dataset_size: int | None = None
    """Number of training samples (needed for webdataset when the shards carry no size file)."""
    synthetic_size: int = 20000
    """Train-stream size of the embedded synthetic data (one epoch)."""
    val_size: int = 500
    """Held-out retrieval pairs."""
    eval_size: int = 400
    """Images per zero-shot task."""
    csv_img_key: str = "filepath"
    """csv: column holding the image paths."""
    csv_caption_key: str = "title"
    """csv: column holding the captions."""
    csv_separator: str = ","
    """csv: field separator."""
    fmnist_root: str | None = None
    """Folder with Fashion-MNIST IDX files (default: where Debian's dataset-fashion-mnist puts them)."""
    workers: int = 0
    """DataLoader worker processes per training process (0 = load in the training process)."""
    resampled: bool = False
    """webdataset: sample shards with replacement (infinite stream)."""
    train_num_samples: int | None = None
    """webdataset: samples per epoch (open_clip's --train-num-samples); None = dataset_size."""
    max_empty_batches: int = 20
    """Stop with an error after this many batches in a row without one usable sample."""
    max_skip_fraction: float = 0.5
    """Stop with an error once more than this fraction of the samples read is unusable (1 = never)."""
    val_path: str | None = None
    """Validation image-caption pairs for retrieval R@1/5/10: a CSV like train_path's, or webdataset shards."""

    def validate(self) -> None:
        """A registered source, data.train_path exactly when the source reads it, sizes in range."""
        check_choice(self.source, tuple(SOURCES), "data.source")
        if SOURCES[self.source].reads_train_path and not self.train_path:
            raise ConfigError(f"data.source={self.source} needs --data.train-path (a CSV file or shard pattern)")
        if not SOURCES[self.source].reads_train_path and self.train_path:
            readers = " or ".join(f"--data.source {name}" for name, s in SOURCES.items() if s.reads_train_path)
            raise ConfigError(
                f"data.train_path={self.train_path!r} is set but data.source={self.source} does not read it "
                f"(pass {readers}, or drop --data.train-path)"
            )
        at_least("data.dataset_size", self.dataset_size, 1, ", or none")
        at_least("data.synthetic_size", self.synthetic_size, 1)
        at_least("data.val_size", self.val_size, 1)
        at_least("data.eval_size", self.eval_size, 1)
        at_least("data.workers", self.workers, 0, "; 0 = load in the training process")

@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (warm-up, then cosine, const or const-cooldown)."""

    lr: float = 1e-3
    """Peak AdamW learning rate (after the linear warm-up; then as optim.lr_scheduler says)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the weight matrices (gains, biases and embeddings get none, as in open_clip)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up from 0."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    fused: bool | None = None
    """AdamW's fused kernel (one pass over each parameter instead of one per operation: on a tiny model on the
    CPU the optimizer step is about 10x faster); None = fused on the CPU and CUDA, false = torch's default
    implementation (open_clip's). The same update up to floating-point rounding."""
    lr_temperature: float | None = None
    """Learning rate of logit_scale (and logit_bias); None = same as lr."""
    temperature_step_thresh: bool = False
    """Divide the temperature lr by 3 while the temperature 1/s is 0.03 or below (re-checked every step)."""
    temperature_step_thresh_latch: bool = False
    """step_thresh: once 1/s has reached 0.03, keep the lower rate for the rest of the run (no re-check)."""
    lr_temperature_schedule: LrTemperatureSchedule | None = None
    """const | same-as-lr (optim.lr_scheduler's shape); None: const when lr_temperature is set (releases), else
    same-as-lr."""
    lr_scheduler: LrScheduler = "cosine"
    """After the warm-up (open_clip's --lr-scheduler): cosine decay to min_lr at the last step; const; or
    const-cooldown: const, then a decay to lr_cooldown_end over the last lr_cooldown_steps."""
    min_lr: float = 0.0
    """cosine: the rate at the last step (the floor; absolute, at most lr)."""
    lr_cooldown_steps: int | None = None
    """const-cooldown: length of the cooldown, the last N steps of the run (required there; open_clip counts
    epochs: --epochs-cooldown E is E * steps per epoch here)."""
    lr_cooldown_power: float = 1.0
    """const-cooldown: decay (1 - t) ** power over the cooldown, t from 0 to 1 (1 = linear)."""
    lr_cooldown_end: float = 0.0
    """const-cooldown: the rate at the last step (absolute, at most lr)."""

    def validate(self) -> None:
        """Rates, AdamW's constants, and the keys of optim.lr_scheduler (set only for the scheduler that reads
        them). The cooldown's fit in the run is a rule across sections (`amorlip.config.validation`)."""
        positive("optim.lr", self.lr, "1e-3")
        positive("optim.lr_temperature", self.lr_temperature, "1e-4, or none for optim.lr")
        positive("optim.eps", self.eps, "1e-6")
        at_least("optim.weight_decay", self.weight_decay, 0)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        at_least("optim.grad_clip", self.grad_clip, 0, "; 0 = no clipping")
        for key, beta, example in (("optim.beta1", self.beta1, "0.9"), ("optim.beta2", self.beta2, "0.98")):
            if not 0 <= beta < 1:
                raise ConfigError(f"{key}={beta} must be in [0, 1) (pass e.g. {flag_of(key)} {example})")
        self._validate_lr_scheduler()

    def _validate_lr_scheduler(self) -> None:
        scheduler = self.lr_scheduler
        check_choice(scheduler, get_args(LrScheduler), "optim.lr_scheduler")
        for key, value, example in (("optim.min_lr", self.min_lr, "1e-5"),
                                    ("optim.lr_cooldown_end", self.lr_cooldown_end, "0")):
            if not (math.isfinite(value) and 0 <= value <= self.lr):
                raise ConfigError(f"{key}={value} must be between 0 and optim.lr={self.lr} "
                                  f"(pass e.g. {flag_of(key)} {example})")
        positive("optim.lr_cooldown_power", self.lr_cooldown_power, "1 for a linear cooldown")
        unused = {"optim.min_lr": self.min_lr != 0.0 and scheduler != "cosine"}
        for key, changed in (("optim.lr_cooldown_steps", self.lr_cooldown_steps is not None),
                             ("optim.lr_cooldown_power", self.lr_cooldown_power != 1.0),
                             ("optim.lr_cooldown_end", self.lr_cooldown_end != 0.0)):
            unused[key] = changed and scheduler != "const-cooldown"
        for key, is_unused in unused.items():
            if is_unused:
                wants = "cosine" if key == "optim.min_lr" else "const-cooldown"
                raise ConfigError(f"{key} is set but optim.lr_scheduler={scheduler} does not read it (pass "
                                  f"--optim.lr-scheduler {wants}, or drop {flag_of(key)})")
        if scheduler == "const-cooldown" and self.lr_cooldown_steps is None:
            raise ConfigError("optim.lr_scheduler=const-cooldown needs optim.lr_cooldown_steps (pass e.g. "
                              "--optim.lr-cooldown-steps 1000: the last 1000 steps decay to optim.lr_cooldown_end)")
        if scheduler == "const-cooldown" and self.lr_cooldown_steps < 1:
            raise ConfigError(f"optim.lr_cooldown_steps={self.lr_cooldown_steps} must be at least 1 "
                              "(pass --optim.lr-cooldown-steps 1 or more)")

@dataclass
class TemperatureConfig:
    """How the learnt temperature 1/s enters the loss."""

    scheme: Scheme = "auto"
    """plain: optimise L. rescaled: L / sg(s) + rho / s (FastCLIP; AmorLIP App. D). auto: what the objective
    needs (rescaled for FastCLIP-v3, whose temperature update is written for it; plain otherwise)."""
    rho: float = 6.5
    """rho of the rescaled scheme (its term rho / s)."""
    rho_final: float | None = None
    """rho for the last `rho_final_fraction` of training (None keeps rho throughout)."""
    rho_final_fraction: float = 0.25
    """Fraction of the training steps, at the end, that use rho_final."""

    def validate(self) -> None:
        """A resolved scheme (`auto` is replaced before validation) and rho_final_fraction in (0, 1]. rho may be
        negative: the released AmorLIP CC12M schedule ends at rho_final = -8.5."""
        check_choice(self.scheme, tuple(s for s in get_args(Scheme) if s != "auto"), "temperature.scheme")
        if not 0 < self.rho_final_fraction <= 1:
            raise ConfigError(
                f"temperature.rho_final_fraction={self.rho_final_fraction} must be in (0, 1] "
                "(pass e.g. --temperature.rho-final-fraction 0.25)"
            )

@dataclass
class TrainConfig:
    """The training run: length, device, run folder, checkpoints, logging."""

    batch_size: int = 64
    """Global batch size (split evenly across processes)."""
    accum_steps: int = 1
    """Cached-feature accumulation (GradCache): each process's batch runs as this many micro-batches (features
    first without autograd, the objective once on the whole batch, then each micro-batch's backward), so the
    memory is that of one micro-batch and the result that of the whole batch. Must divide the per-process
    batch. Exact for models without BatchNorm (ViTs); ResNets see micro-batch statistics."""
    steps: int | None = 600
    """Total optimizer steps; None = epochs * steps per epoch."""
    epochs: int | None = None
    """Used when steps is None."""
    seed: int = 0
    """Seed of the model initialisation, data order and objective state."""
    device: Device = "auto"
    """auto: cuda when a GPU is visible, else cpu."""
    output_dir: str = "runs"
    """Folder holding the run folders."""
    name: str | None = None
    """Run folder name under output_dir (default: objective-model-seed)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = by time only, see checkpoint_minutes, and at the end)."""
    checkpoint_minutes: float = 30.0
    """Also save a checkpoint when this many minutes have passed since the last one (0 = off). SIGTERM and
    SIGUSR1 (pre-emption) always save one before the run exits."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0 = all)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    log_every: int = 10
    """Log (metrics.jsonl, progress line) every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files in the run folder."""
    resume: str | None = None
    """`latest` (the run folder's newest checkpoint), `auto` (latest if there is one, else start fresh) or a
    checkpoint path. Refused when the checkpoint was made with settings that change results."""
    resume_allow_changes: str | None = None
    """Comma-separated keys a resume may change (e.g. optim.lr,train.steps; `all` for any; world_size for
    another process count); others that differ from the checkpoint's settings are an error."""
    stop_at: int | None = None
    """Stop after this global step (checkpoint saved; schedules still span the whole run): for time-limited jobs."""
    progress: bool = True
    """Show a progress bar on a terminal (a plain line every log_every steps otherwise)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    tf32: bool = True
    """CUDA: fp32 matmuls and convolutions may use TF32 tensor cores (as open_clip's trainer sets)."""
    cudnn_benchmark: bool = True
    """CUDA: let cuDNN time and pick its fastest convolution algorithms (as open_clip's trainer sets)."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'amorlip[wandb]'; WANDB_MODE=offline works without network)."""
    wandb_project: str = "amorlip"
    """W&B project."""
    wandb_name: str | None = None
    """W&B run name (default: the run folder's name)."""
    wandb_tags: str | None = None
    """Comma-separated W&B tags."""
    save_final: SaveFinal = "full"
    """full: keep checkpoints as keep_checkpoints says. weights: also write RUN/final_weights.pt (the model only) and keep only the final full checkpoint."""
    export_final: bool = False
    """At the end, export the final model as an open_clip checkpoint into RUN/export/ (as `amorlip export` does)."""

    def validate(self) -> None:
        """A device, the run's length, intervals and counts in range, a batch that splits into train.accum_steps,
        a run-folder name that is one folder, and a save_final choice."""
        check_choice(self.device, get_args(Device), "train.device")
        if self.batch_size < 2:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be at least 2 (contrastive losses need negatives; "
                "pass --train.batch-size 2 or more)"
            )
        if self.steps is None and self.epochs is None:
            raise ConfigError("train.steps and train.epochs are both unset (pass --train.steps N or --train.epochs N)")
        at_least("train.steps", self.steps, 1)
        at_least("train.epochs", self.epochs, 1)
        at_least("train.log_every", self.log_every, 1)
        at_least("train.checkpoint_every", self.checkpoint_every, 0, "; 0 = by time and at the end only")
        at_least("train.checkpoint_minutes", self.checkpoint_minutes, 0, "; 0 = off")
        at_least("train.keep_checkpoints", self.keep_checkpoints, 0, "; 0 = keep all")
        at_least("train.eval_every", self.eval_every, 0, "; 0 = only at the end")
        at_least("train.threads", self.threads, 0, "; 0 = torch's default")
        at_least("train.accum_steps", self.accum_steps, 1, "; 1 = no accumulation")
        split_batch(self.batch_size, 1, self.accum_steps)
        self._validate_stop_at()
        self._validate_name()
        check_choice(self.save_final, get_args(SaveFinal), "train.save_final")

    def _validate_stop_at(self) -> None:
        if self.stop_at is None:
            return
        if self.stop_at < 1:
            raise ConfigError(
                f"train.stop_at={self.stop_at} must be a step of at least 1 (pass --train.stop-at 1 or more, "
                "or --train.stop-at none)"
            )
        if self.steps is not None and self.stop_at > self.steps:
            raise ConfigError(
                f"train.stop_at={self.stop_at} is past the last step, train.steps={self.steps} "
                "(lower --train.stop-at, raise --train.steps, or pass --train.stop-at none)"
            )

    def _validate_name(self) -> None:
        name = self.name
        if name is not None and (len(os.fsencode(name)) > NAME_MAX or name in ("", ".", "..") or "/" in name):
            raise ConfigError(
                f"train.name={name[:40]!r}{'...' if len(name) > 40 else ''} ({len(os.fsencode(name))} bytes) must "
                f"be one folder name of 1 to {NAME_MAX} bytes without '/' (pass a shorter --train.name, or none for "
                "objective-model-seed)"
            )

@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    batch_size: int = 256
    """Evaluation batch size."""
    zeroshot: bool = True
    """Run the zero-shot classification tasks."""
    retrieval: bool = True
    """Run image-text retrieval on the held-out pairs."""
    imagenet_root: str | None = None
    """ImageNet-style folder (one sub-folder of images per class, e.g. n01440764/) for zero-shot classification."""
    normalizers: bool = False
    """Normalizer diagnostics at every evaluation: MSE and bias of the in-batch and of the objective's own log
    partition estimates against the reference, per modality, on eval.normalizer_size training pairs (a fixed
    subset) and held-out pairs; logged as eval/normalizer/... (docs/evaluation.md)."""
    normalizer_size: int = 512
    """Pairs per split of eval.normalizers (the reference costs n^2 similarities; the in-batch B is capped at n)."""

    def validate(self) -> None:
        """Batch and diagnostic sizes in range."""
        at_least("eval.batch_size", self.batch_size, 1)
        at_least("eval.normalizer_size", self.normalizer_size, 2)


CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "temperature": TemperatureConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
