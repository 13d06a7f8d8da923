"""archive: a zip/tar at `url`, verified by `sha256`, extracted once under the work dir, then read as a
folder (`path`: a subfolder inside it; `labels`: a manifest inside it)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from emopipe.catalog import DatasetSpec
from emopipe.core.download import download_file, extract_archive
from emopipe.core.sources.paths import locked


def extraction_folder(spec: DatasetSpec, work_dir: Path) -> Path:
    """Where the archive is extracted: keyed by the sha256, so a new checksum in the catalog means a fresh
    download. Extraction goes to a temp folder renamed into place, so a folder that exists is complete."""
    return work_dir / f"archive-{spec.sha256.lower()[:16]}"


def extracted_archive(spec: DatasetSpec, work_dir: Path) -> Path:
    """The archive's extraction folder, downloading and extracting it the first time."""
    extracted = extraction_folder(spec, work_dir)
    if extracted.is_dir():
        return extracted
    work_dir.mkdir(parents=True, exist_ok=True)
    with locked(work_dir / ".lock"):
        if extracted.is_dir():  # another process finished it while we waited
            return extracted
        for stale in work_dir.glob(".extracting-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        archive = work_dir / f"{extracted.name}.download"
        if not archive.exists():
            download_file(spec.url, archive, spec.sha256)
        tmp = Path(tempfile.mkdtemp(dir=work_dir, prefix=".extracting-"))
        try:
            extract_archive(archive, tmp, spec.url)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.chmod(0o755)  # mkdtemp makes it private; the extraction is ordinary data
        os.rename(tmp, extracted)
        archive.unlink()  # the extraction is complete; the archive would double the disk use
    return extracted
