"""The objectives' options: one dataclass per objective, and the hooks its registry entry names (what
`temperature.scheme auto` means for FastCLIP, FastCLIP's rule across sections). Torch-free, so that the config
layer (`amorlip.config`: `--help`, presets, validation) never imports torch; each objective's module re-exports
its own class (`from amorlip.objectives.amorlip import AmorConfig`), which the registry
(`amorlip.objectives.registry`) names as its `Config`.

The field docstrings are the `--help` texts (jsonargparse reads them), and each `validate()` is called by
`amorlip.config.validate`, its ValueError shown as `[section] message`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from amorlip.errors import ConfigError


def validate_tile_size(key: str, value: Any) -> None:
    """One-line error naming `key` for anything but None or an int >= 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be null (auto), 0 (never tiled) or a positive number of rows (got {value!r})")


# ----------------------------------------------------------------------------------------------------
# clip, siglip


@dataclass
class ClipConfig:
    """Options of `--objective clip` (CLI: `--clip.KEY VALUE`)."""

    tile_size: int | None = None
    """Rows per tile of the tiled exact loss (objectives/tiled.py; never holds the B x N logits): null = auto
    (dense up to 2048 x 2048, then ~2M-entry strips), 0 = never tiled, a value >= the local batch = dense."""

    def validate(self) -> None:
        validate_tile_size("clip.tile_size", self.tile_size)


@dataclass
class SigLipConfig:
    """Options of `--objective siglip` (CLI: `--siglip.KEY VALUE`)."""

    tile_size: int | None = None
    """Rows per tile of the tiled exact loss (objectives/tiled.py; never holds the B x N logits): null = auto
    (dense up to 2048 x 2048, then ~2M-entry strips), 0 = never tiled, a value >= the local batch = dense."""

    def validate(self) -> None:
        validate_tile_size("siglip.tile_size", self.tile_size)


# ----------------------------------------------------------------------------------------------------
# sogclr, fastclip


@dataclass
class SogCLRConfig:
    """Options of `--objective sogclr` (CLI: `--sogclr.KEY VALUE`)."""

    gamma: float = 0.9
    """Constant moving-average rate of u (SogCLR paper: 0.9); a sample's first visit uses 1."""
    temperature: float | None = 0.07
    """Constant temperature 1/s used by the loss (SogCLR's setting; 0.07 is the released FastCLIP code's
    default for its constant-temperature scheme). None: use the model's learnable s instead."""
    u_on_cpu: bool | None = None
    """Keep the u buffers in CPU memory. None: only when the dataset has more than 1M samples."""
    eps: float = 0.0
    """Objective log(eps + g), weights 1/(u + eps). 0: none (SogCLR's own code divides by u alone)."""
    tile_size: int | None = None
    """Rows per tile of the tiled exact loss (objectives/tiled.py; never holds the B x N products): null = auto
    (dense up to 2048 x 2048, then ~2M-entry strips), 0 = never tiled, a value >= the local batch = dense."""

    def validate(self) -> None:
        validate_tile_size("sogclr.tile_size", self.tile_size)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must be in (0, 1] (the moving-average rate of u)")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be positive (or None for the learnable one)")
        if not self.eps >= 0.0:
            raise ValueError(f"eps={self.eps} must be >= 0")


FastCLIPVersion = Literal[0, 1, 3]
TemperatureGrad = Literal["release", "exact"]
FASTCLIP_VERSIONS = get_args(FastCLIPVersion)
TEMPERATURE_GRADS = get_args(TemperatureGrad)


@dataclass
class FastCLIPConfig:
    """Options of `--objective fastclip` (CLI: `--fastclip.KEY VALUE`). Defaults: FastCLIP-v3, CC3M release."""

    version: FastCLIPVersion = 3
    """0: GCL + learnable temperature (plain gradient); 1: GCL + constant temperature; 3: RGCL-g (needs
    temperature.scheme rescaled). Version 2 (individual temperatures) is not implemented."""
    gamma_min: float = 0.2
    """Final value of gamma (cosine decay from 1 over `gamma_decay_epochs`)."""
    gamma_decay_epochs: int = 18
    """E: epochs of the cosine decay of gamma (18 CC3M, 16 CC12M; about half the epochs)."""
    temperature: float = 0.07
    """Constant temperature of version 1 (the released code's default)."""
    u_on_cpu: bool | None = None
    """Keep the u buffers in CPU memory. None: only when the dataset has more than 1M samples."""
    eps: float = 1e-14
    """Objective log(eps + g), weights 1/(u + eps) (the release's --fastclip_eps default 1e-14; 0: none)."""
    temperature_grad: TemperatureGrad = "release"
    """Gradient of the learnt s (versions 0, 3). release: as the released code, s attached in the row and
    the column block (each pair's term counted twice in d/ds) and log u without eps in the v3 term, the setting
    its rho values were tuned with. exact: the gradient of RGCL-g (v3: tau GCL_eps + rho tau) with g -> u."""
    tile_size: int | None = None
    """Rows per tile of the tiled exact loss (objectives/tiled.py; never holds the B x N products): null = auto
    (dense up to 2048 x 2048, then ~2M-entry strips), 0 = never tiled, a value >= the local batch = dense."""

    def validate(self) -> None:
        validate_tile_size("fastclip.tile_size", self.tile_size)
        if self.version == 2:
            raise ValueError(
                "fastclip.version=2 (per-sample temperatures, iSogCLR's RGCL) is not implemented; "
                "use 3 (global learnable temperature, the default), 1 (constant) or 0"
            )
        if self.version not in FASTCLIP_VERSIONS:
            raise ValueError(f"fastclip.version={self.version} is not one of {FASTCLIP_VERSIONS}")
        if not 0.0 < self.gamma_min <= 1.0:
            raise ValueError(f"gamma_min={self.gamma_min} must be in (0, 1]")
        if self.gamma_decay_epochs < 0:
            raise ValueError(f"gamma_decay_epochs={self.gamma_decay_epochs} must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be positive")
        if not self.eps >= 0.0:
            raise ValueError(f"eps={self.eps} must be >= 0")
        if self.temperature_grad not in TEMPERATURE_GRADS:
            raise ValueError(f"temperature_grad={self.temperature_grad!r} is not one of: {', '.join(TEMPERATURE_GRADS)}")


def fastclip_temperature(options: FastCLIPConfig) -> str:
    """What `temperature.scheme auto` means for FastCLIP: RGCL-g (version 3) learns its temperature through the
    rescaled scheme (FastCLIP Alg. 1, line 11); versions 0 and 1 optimise the plain loss."""
    return "rescaled" if options.version == 3 else "plain"


def check_fastclip_temperature(options: FastCLIPConfig, cfg: Any) -> None:
    """FastCLIP x the run's temperature scheme: version 3 needs the rescaled one (ConfigError naming the fix)."""
    if options.version == 3 and cfg.temperature.scheme != "rescaled":
        raise ConfigError(
            f"fastclip.version=3 (RGCL-g) learns its temperature through the rescaled scheme, not "
            f"temperature.scheme={cfg.temperature.scheme} (pass --temperature.scheme rescaled, or --fastclip.version 0 "
            "for GCL with the plain gradient)"
        )


# ----------------------------------------------------------------------------------------------------
# amorlip

Arch = Literal["mlp", "residual"]
AmorLoss = Literal["l2-log", "f-div"]
FDiv = Literal["kl", "js", "kl-eq9"]
DivideBy = Literal["comb", "target", "online"]
Stage2Negatives = Literal["local", "global"]
Reinit = Literal["fresh", "warm"]
ARCHS, AMOR_LOSSES, FDIVS = get_args(Arch), get_args(AmorLoss), get_args(FDiv)
DIVIDE_BY, STAGE2_NEGATIVES, REINITS = get_args(DivideBy), get_args(Stage2Negatives), get_args(Reinit)


@dataclass
class AmorConfig:
    """Options of `--objective amorlip` (CLI: `--amor.KEY VALUE`). Defaults: the paper's CC3M setting."""

    arch: Arch = "mlp"
    """mlp: the paper's three-layer MLP (Sec. 4). residual: the released variant
    (Linear-ReLU-LayerNorm, Linear-ReLU-LayerNorm, + input, ReLU, Linear)."""
    dim_factor: float = 0.5
    """f_d: hidden width = f_d * embed_dim (0.5 CC3M, 1.0 CC12M)."""
    loss: AmorLoss = "l2-log"
    """Stage-I amortization loss: l2-log (Eq. 10) | f-div (Eq. 8)."""
    fdiv: FDiv = "kl"
    """f for loss=f-div: kl (generalised KL t log t - t + 1, minimised at lambda = Z) | js |
    kl-eq9 (Eq. 9 literally, t log t: its minimiser is lambda = e * Z)."""
    fdiv_l2_coef: float = 0.1
    """Weight of the l2-log regulariser added to the f-div loss (App. D: 0.1)."""
    pos_coef: float = 1.0
    """Weight of the positive pair inside every partition function (target and Stage II). 1.0 = the
    full partition function (paper Table 3); the released training command uses 1e-3."""
    t_online: int = 8
    """T_online: run Stage I every this many steps (8 CC3M, 1 CC12M)."""
    t_lambda: int = 3
    """T_lambda: Adam steps per Stage I on the same batch."""
    t_target: int = 2
    """T_target: EMA-update the target net every this many steps."""
    alpha: float = 0.999
    """EMA decay of the target net (Eq. 11; 0.999 CC3M, 0.92 CC12M)."""
    ema_debias: bool = False
    """Bias-correct the EMA (as Adam does), so that after a re-init the target net is the average of the
    online iterates instead of lagging behind its random initialisation."""
    beta_final: float = 0.8
    """beta_T: final weight of the previous-epoch net in Z_comb (Eq. 12)."""
    beta_decay_epochs: int | None = None
    """Epochs of the cosine ramp of beta from 0 to beta_final (None = all training epochs)."""
    lr: float = 1e-3
    """Adam learning rate of the amortization nets (App. D)."""
    divide_by: DivideBy = "comb"
    """Stage II divisor: comb (this batch's Z_comb, released code) | target (target net, paper) |
    online (online net)."""
    reinit: Reinit = "fresh"
    """At each epoch start: fresh (re-initialise online and target nets, Algorithm 1 line 4) |
    warm (restart them from the previous-epoch net)."""
    init_bias: bool = False
    """After a fresh re-initialisation, shift the nets' output bias to the first batch's mean target."""
    max_log_ratio: float | None = 10.0
    """Cap on log(Z_batch / lambda) in Stage II (a detached floor on log lambda), so that a net far below
    the batch partition cannot overflow exp; None disables. Never binds for divide_by=comb."""
    stage2_negatives: Stage2Negatives = "local"
    """local: Stage II uses this rank's pairs only (no collective). global: all ranks' features,
    gathered with gradient every step (released code)."""
    sync_grads: bool = True
    """All-reduce (mean) the Stage-I gradients on amortization steps, guarding the replicas against drift."""
    tile_size: int | None = None
    """Rows per tile of the tiled exact partitions (Stage I targets and Stage II; objectives/tiled.py): null = auto
    (dense up to 2048 x 2048, then ~2M-entry strips), 0 = never tiled, a value >= the batch = dense."""

    def validate(self) -> None:
        for key, value, choices in (
            ("arch", self.arch, ARCHS),
            ("loss", self.loss, AMOR_LOSSES),
            ("fdiv", self.fdiv, FDIVS),
            ("divide_by", self.divide_by, DIVIDE_BY),
            ("reinit", self.reinit, REINITS),
            ("stage2_negatives", self.stage2_negatives, STAGE2_NEGATIVES),
        ):
            if value not in choices:
                raise ValueError(f"amor.{key}={value!r} is not one of: {', '.join(choices)}")
        if not self.dim_factor > 0:
            raise ValueError(f"amor.dim_factor must be positive (got {self.dim_factor}); the paper uses 0.5 or 1.0")
        for key in ("t_online", "t_lambda", "t_target"):
            if getattr(self, key) < 1:
                raise ValueError(f"amor.{key} must be at least 1 (got {getattr(self, key)})")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"amor.alpha is an EMA decay and must be in [0, 1) (got {self.alpha})")
        if not 0.0 <= self.beta_final <= 1.0:
            raise ValueError(f"amor.beta_final is a mixing weight and must be in [0, 1] (got {self.beta_final})")
        if self.beta_decay_epochs is not None and self.beta_decay_epochs < 0:
            raise ValueError("amor.beta_decay_epochs must be >= 0, or null for all training epochs")
        if not self.lr > 0:
            raise ValueError(f"amor.lr must be positive (got {self.lr})")
        if self.pos_coef < 0:
            raise ValueError(f"amor.pos_coef must be >= 0 (got {self.pos_coef}); 1.0 is the full partition function")
        if self.fdiv_l2_coef < 0:
            raise ValueError(f"amor.fdiv_l2_coef must be >= 0 (got {self.fdiv_l2_coef})")
        if self.max_log_ratio is not None and not self.max_log_ratio > 0:
            raise ValueError("amor.max_log_ratio must be positive, or null to disable the cap")
        validate_tile_size("amor.tile_size", self.tile_size)


# ----------------------------------------------------------------------------------------------------
# neuclip


@dataclass
class NeuCLIPConfig:
    """Options of `--objective neuclip` (CLI: `--neuclip.KEY VALUE`). Values beyond m = 4096 are this
    project's choices (the paper's are not public); see docs/neuclip.md."""

    num_prototypes: int = 4096
    """m: prototypes per modality (capped at the dataset size)."""
    inner_steps: int = 1
    """T_u: AdaGrad steps on the prototypes per batch."""
    restart_every: int = 500
    """T_r: restart the prototypes from the most recent m batch embeddings every this many steps."""
    lr: float = 1e-3
    """AdaGrad learning rate of the prototypes."""
    adagrad_eps: float = 1e-10
    eps: float = 1e-14
    """eps in log(eps + g) (Eq. N1). 1/(B-1) turns the loss into InfoNCE at batch size B."""
    temperature_term: bool = True
    """Add FastCLIP-v3's temperature term (mean alpha) / s (use with temperature.scheme rescaled)."""
    tile_size: int | None = None
    """Rows per tile of the tiled exact losses (objectives/tiled.py: the SogCLR surrogate's B x N products and
    the B x m prototype log-sum-exps): null = auto (dense up to 2048 x 2048 entries, then ~2M-entry strips),
    0 = never tiled, a value >= the rows = dense."""

    def validate(self) -> None:
        validate_tile_size("neuclip.tile_size", self.tile_size)
        if self.num_prototypes < 1:
            raise ValueError(f"num_prototypes={self.num_prototypes} must be at least 1")
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps={self.inner_steps} must be >= 0")
        if self.restart_every < 1:
            raise ValueError(f"restart_every={self.restart_every} must be at least 1 (steps between restarts)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive (AdaGrad learning rate of the prototypes)")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be positive (it keeps log(eps + g) finite)")
