"""The typed training config. Presets live in ``model/presets/{tiny,mid,sd15}.yaml``; any field can be
overridden with dotted ``key=value`` pairs (``quality_tune.max_steps=500``). Unknown keys are rejected,
so a typo fails at load time instead of silently training with a default.

One config describes the whole model (autoencoder, text encoder, UNet, noise schedule) and both
training stages: ``pretrain`` (progressive-resolution stages on the pool) and ``quality_tune`` (Emu's
recipe on the curated set). The config is saved beside every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import warnings
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(UserError, ValueError):
    """The training config cannot be used as given: an unknown preset, a bad override, or a field that
    fails validation (the message names its dotted path, e.g. ``quality_tune.max_step``)."""


class ConfigWarning(UserWarning):
    """The config is valid but asks for something its papers advise against (see ``config_warnings``)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoencoderConfig(_Strict):
    """Where latents come from. ``kind``:

    - ``pretrained``: a diffusers autoencoder (AutoencoderKL or AutoencoderTiny) by path or hub name;
    - ``taesd``: a TAESD-family tiny autoencoder from its two original ``.pth`` files (e.g. TAEF2,
      32 latent channels), mapped into diffusers' AutoencoderTiny;
    - ``kl``: an AutoencoderKL trained by this stage (Emu §3.1: 4/8/16 latent channels, optional Fourier
      feature input lifting and adversarial loss); trained once into ``path`` (default
      ``OUT/autoencoder``) when that holds no weights yet.
    """

    kind: Literal["pretrained", "taesd", "kl"] = "kl"
    path: str | None = None
    subfolder: str | None = None
    encoder_path: str | None = None
    decoder_path: str | None = None
    # kl: architecture and its own short training run
    latent_channels: int = 4
    block_out_channels: list[int] = [32, 64, 64, 64]
    layers_per_block: int = 1
    norm_num_groups: int = 32
    fourier_frequencies: int = 0  # 0 = plain RGB input; n lifts RGB to 3 + 6n channels (Emu §3.1)
    adversarial_weight: float = 0.0  # 0 = no discriminator; else x the adaptive weight (Taming Transformers eq. 7)
    kl_weight: float = 1e-6
    train_steps: int = 200
    train_batch_size: int = 8
    train_resolution: int = 64
    learning_rate: float = 2e-4
    # latents are multiplied by this before diffusion; null = 1/std of the first cached latents
    scaling_factor: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "AutoencoderConfig":
        if self.kind == "pretrained" and not self.path:
            raise ValueError("autoencoder.kind=pretrained needs autoencoder.path (a diffusers VAE path or name)")
        if self.kind == "taesd" and not (self.encoder_path and self.decoder_path):
            raise ValueError("autoencoder.kind=taesd needs autoencoder.encoder_path and autoencoder.decoder_path")
        return self


class TextEncoderConfig(_Strict):
    """The frozen text encoder the UNet cross-attends to. ``kind: clip`` (default): a transformers
    CLIPTextModel + CLIPTokenizer path or name (e.g. ``openai/clip-vit-large-patch14``); ``kind: t5``: the
    encoder of a T5 checkpoint (T5EncoderModel + its tokenizer, e.g. ``google/t5-v1_1-xl``; Emu and
    Imagen-style models condition on T5 for long, compositional prompts; raise ``max_length`` to 120-256
    for it). ``path: null`` builds a TINY RANDOMLY-INITIALISED encoder of that kind from the ``tiny_*``
    fields, for CPU tests and smoke runs only: its embeddings carry no meaning."""

    kind: Literal["clip", "t5"] = "clip"
    path: str | None = None
    max_length: int = 77
    tiny_hidden_size: int = 32
    tiny_layers: int = 2
    tiny_heads: int = 4


class UNetConfig(_Strict):
    """UNet2DConditionModel's architecture (in/out channels follow the autoencoder; cross-attention width
    follows the text encoder)."""

    block_out_channels: list[int] = [32, 64]
    layers_per_block: int = 1
    down_block_types: list[str] = ["CrossAttnDownBlock2D", "DownBlock2D"]
    up_block_types: list[str] = ["UpBlock2D", "CrossAttnUpBlock2D"]
    attention_head_dim: int = 8
    norm_num_groups: int = 32


class DiffusionConfig(_Strict):
    """The noise schedule: ``scaled_linear`` (SD), ``zero_snr`` (scaled_linear rescaled to zero terminal
    SNR; needs v-prediction, since ε is unidentifiable from pure noise), or ``edm`` (Playground v2.5)."""

    schedule: Literal["scaled_linear", "zero_snr", "edm"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    min_snr_gamma: float | None = 5.0  # null = unweighted

    @model_validator(mode="after")
    def _check(self) -> "DiffusionConfig":
        if self.schedule == "zero_snr" and self.prediction_type != "v_prediction":
            raise ValueError("diffusion.schedule=zero_snr needs prediction_type=v_prediction: at the last step "
                             "z_T is pure noise, so predicting ε is trivial and carries no signal")
        if self.schedule == "edm" and self.prediction_type != "epsilon":
            raise ValueError("diffusion.schedule=edm trains F with EDM preconditioning; use prediction_type=epsilon "
                             "(what diffusers' EDMEulerScheduler calls it)")
        return self


class LoraConfig(_Strict):
    """LoRA on the UNet (peft; diffusers' LoRA scripts' defaults): rank, alpha (null = rank), dropout and
    the module names it adapts (the attention projections by default)."""

    rank: int = Field(16, ge=1)
    alpha: float | None = None
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)


class StageConfig(_Strict):
    """One run of the training loop (a pre-training resolution stage, or quality-tuning)."""

    name: str
    # bucket base side in pixels (each bucket has about resolution² pixels); null = a public base's native
    # size (512 for SD 1.5, 768 for SD 2.x-v, 1024 for SDXL)
    resolution: int | None
    max_steps: int  # optimizer steps
    batch_size: int = 64  # effective batch = batch_size; micro-batches of micro_batch_size accumulate
    micro_batch_size: int | None = None  # null = batch_size (no accumulation)
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    noise_offset: float = 0.0  # Emu's offset noise; a DDPM remedy, unneeded with schedule edm (ConfigWarning)
    # λ of PS eq. 3 (L = latent_loss_weight · L_latent + λ L_pixel); 0 = latent loss only. "auto": λ is
    # measured at the start of the stage "to balance the magnitudes" (PS §4, implementation details): the
    # mean latent and pixel terms over pixel_loss_calibration_batches training batches with its initial weights give
    # λ = pixel_loss_balance x mean latent / mean pixel (recorded in report.json; a resumed run reuses it)
    pixel_loss_weight: Annotated[float, Field(ge=0)] | Literal["auto"] = 0.0
    pixel_loss_calibration_batches: int = Field(8, ge=1)
    pixel_loss_balance: float = Field(1.0, gt=0)  # target λ·L_pixel / L_latent of "auto"
    latent_loss_weight: float = Field(1.0, ge=0)  # 0 with λ > 0: pixel loss only (PS Table 5's "Pixel" row)
    caption_dropout: float = 0.1  # share of captions replaced by "" so classifier-free guidance works
    ema_decay: float | None = 0.9999  # null = no EMA
    grad_clip: float | None = 1.0
    val_fraction: float = 0.05  # held-out share for the validation loss (at least one image)
    eval_every: int = 500
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping; null = off
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    min_images: int = 8
    lora: LoraConfig | None = None  # null = full fine-tuning; else only a LoRA adapter trains
    gradient_checkpointing: bool = False  # recompute UNet (and, for the pixel loss, VAE decoder) activations
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' 8-bit AdamW (install it)

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if self.batch_size % self.micro_batch:
            raise ValueError(f"stage {self.name}: batch_size {self.batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch}")
        if self.resolution is not None and self.resolution % 64:
            raise ValueError(f"stage {self.name}: resolution {self.resolution} must be a multiple of 64")
        if self.latent_loss_weight == 0 and self.pixel_loss_weight == 0:
            raise ValueError(f"stage {self.name}: latent_loss_weight and pixel_loss_weight are both 0, so nothing "
                             f"would be trained; set either above 0")
        return self

    @property
    def uses_pixel_loss(self) -> bool:
        return self.pixel_loss_weight == "auto" or self.pixel_loss_weight > 0


class DataConfig(_Strict):
    missing_captions: Literal["skip", "error"] = "skip"  # skip = drop the row and count it in the report
    # aspect ratios (w/h) of the buckets; every bucket has about resolution² pixels, sides multiples of 64
    bucket_aspect_ratios: list[float] = [1.0, 0.75, 1.333, 0.5625, 1.778]
    # the sampler's share of draws per bucket ∝ size^alpha (0 = every bucket equally, Playground v2.5 §3.2;
    # 1 = by size), capped so no image is drawn more than max_repeat_ratio x as often as the average image
    # (null = no cap); the defaults' measured effect is in model/data.py's BalancedBucketSampler
    bucket_weight_alpha: float = Field(0.5, ge=0, le=1)
    max_repeat_ratio: float | None = Field(4.0, ge=1)


class SampleScoreConfig(_Strict):
    """The automatic score of quality-tuning's evaluation samples, the early-stopping signal when set (Emu
    §3.3 stops early; the signal here is what the curation pipeline's own judges say of the samples).

    The samples: ``n_prompts`` prompts of ``prompts`` (PartiPrompts by default, balanced over its
    categories, seeded) x ``seeds`` seeds, drawn with the same noise at every evaluation. Those prompts
    only choose the checkpoint: they are written beside it (needles_selection_prompts.json) and the
    evaluation stage (``python -m model generate``, the evaluate flow) leaves them out of what it reports.

    ``metric``: ``aesthetic`` (mean LAION aesthetic score), ``clip_score`` (mean CLIP score against the
    prompts), ``aesthetic+clip`` (= aesthetic + clip_weight x clip_score), or ``kid``: minus the KID of the
    samples' ImageNet MobileNetV2 features against a seeded ``reference_limit`` sample of the curated
    images themselves, the offline option (no CLIP weights needed). ``clip`` and ``aesthetic`` are the
    options of the pipeline's ``clip`` and ``aesthetic`` scorers (``python -m pipeline score --help``),
    checked when the config loads."""

    metric: Literal["aesthetic", "clip_score", "aesthetic+clip", "kid"] = "aesthetic+clip"
    clip_weight: float = Field(10.0, ge=0)  # cosines move over ~0.1 where aesthetic scores move over ~1
    clip: dict[str, Any] = {"model": "ViT-L-14", "pretrained": "openai"}
    aesthetic: dict[str, Any] = {"head": "improved_sac+logos+ava1-l14-linearMSE"}
    prompts: str = "parti"  # "parti", "drawbench" or a prompt file (.tsv/.csv/.txt/.parquet/.jsonl)
    n_prompts: int = Field(32, ge=2)
    seeds: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)  # images sampled at once
    reference_limit: int = Field(1000, ge=2)  # kid: curated images in the reference (a seeded sample)

    @model_validator(mode="after")
    def _check(self) -> "SampleScoreConfig":
        from pipeline.scorers import scorer_class

        from model.evaluation.prompts import BUILTIN

        if self.prompts not in BUILTIN and not Path(self.prompts).is_file():
            raise ValueError(f"sample.score.prompts: {self.prompts!r} is neither a built-in set "
                             f"({sorted(BUILTIN)}) nor a file")
        options = {}
        for name in ("clip", "aesthetic"):
            try:
                options[name] = scorer_class(name).Options.model_validate(getattr(self, name))
            except ValidationError as e:
                raise ValueError("; ".join(f"sample.score.{'.'.join(map(str, (name, *err['loc'])))}: {_message(err)}"
                                           for err in e.errors())) from None
            except Exception as e:
                raise ValueError(f"sample.score.{name}: {e}") from e
        if self.metric in ("aesthetic", "aesthetic+clip"):
            from pipeline.scorers.aesthetic import head_clip_mismatch

            clip = options["clip"]
            problem = head_clip_mismatch(options["aesthetic"].head, clip.model, clip.pretrained)
            if problem:
                raise ValueError(f"sample.score: {problem}")
        return self


class SampleConfig(_Strict):
    prompts: list[str] = [
        "a photo of a red fox in the snow",
        "a bowl of ripe oranges on a wooden table",
        "a lighthouse on a cliff at sunset",
        "a portrait of an old fisherman, soft window light",
    ]
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    # the automatic score of each evaluation's samples, which then decides early stopping and the best
    # checkpoint of quality-tuning instead of the held-out loss; null = held-out loss only
    score: SampleScoreConfig | None = None


class PreferenceConfig(_Strict):
    """Preference tuning on (winner, loser) pairs (PS §3.2, eqs. 4-7; model/preference.py, model/train_pref.py):
    ``dpo`` (Diffusion-DPO, a frozen copy of the starting UNet as reference) or ``simpo`` (no reference,
    margin ``simpo_gamma``), with the pixel-space term weighted by ``pixel_loss_weight`` (μ of eq. 7; the
    paper uses 2-8). ``beta``/``pixel_beta`` null = calibrated on the first batch so |β δ| ≈ 1.
    ``feedback``: the pair sources this run trains on (``human`` Label Studio votes, ``ab_round`` the
    evaluation stage's A/B votes, ``ai`` an automatic judge): pairs of any other source are refused, so
    AI feedback never mixes with human votes unless listed."""

    objective: Literal["dpo", "simpo"] = "dpo"
    beta: float | None = Field(None, gt=0)
    pixel_beta: float | None = Field(None, gt=0)
    simpo_gamma: float = Field(0.0, ge=0)
    pixel_loss_weight: float = Field(0.0, ge=0)
    feedback: list[Literal["human", "ab_round", "ai"]] = Field(default_factory=lambda: ["human"], min_length=1)
    resolution: int | None = None  # image side the pairs are cropped to; null = the UNet's native size
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)  # pairs per step
    learning_rate: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "sgd"] = "adamw"
    weight_decay: float = Field(5e-6, ge=0)  # PS §4: Adam with weight decay 5e-6
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    noise_offset: float = 0.0
    val_fraction: float = Field(0.1, ge=0, lt=1)  # held-out pairs for preference accuracy and margin
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(250, ge=1)  # OUT/checkpoints/step-N: a rerun on OUT resumes from the newest
    keep_checkpoints: int = Field(2, ge=1)
    lora: LoraConfig | None = None  # null = the whole UNet trains; else an adapter (the reference = adapter off)
    gradient_checkpointing: bool = False


class Config(_Strict):
    preset: str = "custom"
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()
    pretrain: list[StageConfig] = Field(default_factory=list)
    quality_tune: StageConfig
    preference: PreferenceConfig = PreferenceConfig()

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):  # `--set mixed_precision=no` reads as YAML's false
        return "no" if value is False else value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def model_hash(self) -> str:
        """Hash of what fixes the latent space and text embeddings (cache key for cached latents)."""
        key = {"autoencoder": self.autoencoder.model_dump(mode="json"),
               "text_encoder": self.text_encoder.model_dump(mode="json"), "seed": self.seed}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def load_config(preset_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """A preset name (``tiny``, ``mid``, ``sd15``) or a YAML path, then ``key=value`` overrides (values
    parsed as YAML, so ``quality_tune.ema_decay=null`` and ``unet.block_out_channels=[32,64]`` work)."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no config {preset_or_path!r}: not a file and not a preset ({known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {error}") from None
        try:
            _set_dotted(data, key.strip(), parsed)
        except (LookupError, TypeError, ValueError, AttributeError) as error:
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a field path of the config "
                              f"({type(error).__name__}: {error})") from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as error:
        problems = [_located(e) for e in error.errors()]
        raise ConfigError(f"config {preset_or_path}: " + "; ".join(problems)) from None
    for message in config_warnings(cfg):
        warnings.warn(f"config {preset_or_path}: {message}", ConfigWarning, stacklevel=2)
    return cfg


def config_warnings(cfg: Config) -> list[str]:
    """What a valid config asks for against its papers' advice. Offset noise with the EDM schedule:
    Playground v2.5 §2.1 drops it because EDM's near-zero terminal SNR already lets the model shift mean
    brightness. A warning rather than an error: the offset is still applied as configured, so an ablation
    can measure it (and configs that switch a DDPM preset to edm by override keep loading)."""
    if cfg.diffusion.schedule != "edm":
        return []
    offset = [f"{s.name} (noise_offset {s.noise_offset})" for s in [*cfg.pretrain, cfg.quality_tune] if s.noise_offset]
    return [f"diffusion.schedule=edm with offset noise in {', '.join(offset)}: EDM reaches near-zero terminal "
            f"SNR, so offset noise is unnecessary (Playground v2.5 §2.1); set noise_offset=0 in those stages"] if offset else []


def _located(error: dict) -> str:
    """``dotted.field.path: message`` (a validator's message that already names its field is kept as it is)."""
    where, message = ".".join(map(str, error["loc"])), _message(error)
    return message if not where or message.startswith(where) else f"{where}: {message}"


def _message(error: dict) -> str:
    """pydantic's message of one error, the rejected value named where it says which."""
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return "unknown field (a typo?)"
    if error["type"].endswith("_error") and message.startswith("Value error, "):
        return message[len("Value error, "):]  # a validator's own sentence
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict):
        message += f", got {error['input']!r}"
    return message


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
