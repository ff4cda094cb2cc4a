"""Cache keys for the flow's stage tasks: a stage is redone only when its config or its input files
changed (or its outputs went missing). Files are fingerprinted by path, size and mtime, not content:
cheap on a 200K-image source, and any rewrite changes the mtime."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Iterable


def fingerprint(paths: Iterable[str | Path]) -> str:
    digest = hashlib.sha256()
    for root in sorted(Path(p).resolve() for p in paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            if f.name.startswith("."):
                continue  # temporary files of an interrupted write
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stage_key(stage: str, config: Any, inputs: Iterable[str | Path], outputs_present: bool) -> str:
    """Input paths enter the fingerprint resolved, so a key also names where the stage reads from.
    ``outputs_present`` is part of the key so a deleted output reruns its stage; the run after a
    first run then misses once (outputs now present) and reruns an idempotent stage, cheaply."""
    # Outputs absent: a fresh key every time. A fixed "absent" key would be cached by the very first run,
    # and a later run whose outputs were deleted would get that first result back without its files.
    present = outputs_present or uuid.uuid4().hex
    payload = json.dumps({"stage": stage, "config": config, "present": present}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256((payload + fingerprint(inputs)).encode()).hexdigest()[:32]}"
