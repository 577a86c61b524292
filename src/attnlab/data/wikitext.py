"""WikiText-2 through Hugging Face ``datasets``: from local files when a data root holds them,
else from the Hub (``Salesforce/wikitext``).

Two variants, never substituted for each other:

* ``raw`` - ``wikitext-2-raw-v1``, files ``wiki.{train,valid,test}.raw`` in ``<root>/wikitext-2-raw/``;
* ``v1``  - ``wikitext-2-v1`` (word-level, rare words as ``<unk>``), files ``wiki.*.tokens`` in
  ``<root>/wikitext-2/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from attnlab.errors import MissingInputError

HUB_DATASET = "Salesforce/wikitext"
SPLIT_FILES = {"train": "train", "validation": "valid", "test": "test"}


@dataclass(frozen=True)
class Variant:
    hub_config: str
    folder: str
    extension: str


VARIANTS = {
    "raw": Variant("wikitext-2-raw-v1", "wikitext-2-raw", "raw"),
    "v1": Variant("wikitext-2-v1", "wikitext-2", "tokens"),
}


class DataNotFoundError(MissingInputError):
    """The dataset is neither in ``paths.data_dir`` nor reachable; the message says what to set."""


def local_split_files(variant: str, data_dir: str | Path | None) -> dict[str, Path] | None:
    """The three split files of ``variant`` under ``data_dir`` (``<data_dir>/<folder>/`` or
    ``data_dir`` itself), or None."""
    if not data_dir:
        return None
    spec = VARIANTS[variant]
    for folder in (Path(data_dir) / spec.folder, Path(data_dir)):
        files = {split: folder / f"wiki.{name}.{spec.extension}" for split, name in SPLIT_FILES.items()}
        if all(f.is_file() for f in files.values()):
            return files
    return None


def files_fingerprint(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for split in sorted(files):
        digest.update(split.encode())
        with open(files[split], "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_fingerprint(variant: str, data_dir: str | Path | None) -> str:
    """Cache key part for the source text: local files' sha256, or the Hub config name."""
    files = local_split_files(variant, data_dir)
    if files is not None:
        return "local-" + files_fingerprint(files)
    return f"hub-{HUB_DATASET}-{VARIANTS[variant].hub_config}"


def load_wikitext(variant: str, data_dir: str | Path | None, hf_cache_dir: str | Path | None = None) -> dict[str, str]:
    """The text of each split (lines joined exactly as in the files)."""
    import datasets

    spec = VARIANTS[variant]
    files = local_split_files(variant, data_dir)
    if files is not None:
        ds = datasets.load_dataset("text", data_files={s: str(p) for s, p in files.items()},
                                   keep_linebreaks=True, cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
    else:
        try:
            ds = datasets.load_dataset(HUB_DATASET, spec.hub_config,
                                       cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
        except Exception as error:
            raise DataNotFoundError(_not_found_message(variant, data_dir, error)) from error
    return {split: "".join(ds[split]["text"]) for split in SPLIT_FILES}


def _not_found_message(variant: str, data_dir: str | Path | None, error: Exception) -> str:
    spec = VARIANTS[variant]
    lines = [f"WikiText-2 ({spec.hub_config}, data.variant={variant}) could not be loaded."]
    if data_dir:
        expected = Path(data_dir) / spec.folder
        lines.append(f"No local copy: expected wiki.{{train,valid,test}}.{spec.extension} in {expected} (or {data_dir}).")
        other = "v1" if variant == "raw" else "raw"
        if local_split_files(other, data_dir) is not None:
            lines.append(f"That folder holds the '{other}' variant; it is not used in place of '{variant}'. "
                         f"Pass data.variant={other} to train on it.")
    else:
        lines.append("No data root is set (paths.data_dir / ATTNLAB_DATA_DIR).")
    lines.append(f"Downloading {HUB_DATASET} failed: {type(error).__name__}: {str(error)[:200]}")
    lines.append(f"Fix: set ATTNLAB_DATA_DIR (or paths.data_dir=...) to a folder containing {spec.folder}/"
                 f"wiki.train.{spec.extension} etc., or run with network access.")
    return "\n".join(lines)
