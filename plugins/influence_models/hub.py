"""Download models from the Hugging Face hub into the store.

huggingface_hub (the ``hub`` extra: ``pip install 'influence[hub]'``) does the transfers: it honours
HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE, draws the progress bars, and resumes a file an interrupted
attempt left incomplete; it is imported only when a download starts. This module chooses the
files (never pickle weights), checks each downloaded file against the hub's hashes, and moves a
complete download into the store with one rename, so the store never holds half a model.

A download of ORG/NAME goes to ``models/.ORG--NAME.download`` first; it is kept when a transfer is
interrupted (the next attempt resumes it) and deleted when a file turns out wrong.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from influence_core.artifacts import MANIFEST, format_size, made_here, read_manifest
from influence_core.errors import InfluenceError, ModelFormatError, ModelNotFoundError

from .store import models_dir, remove_entries

REPO_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")  # ORG/NAME; huggingface_hub checks the finer rules
# What a model needs besides its weights; files a repo lacks are skipped.
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
# Unpickling can run arbitrary code, so these are never downloaded, whatever --include says.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def store_directory(repo_id: str) -> Path:
    """Where ORG/NAME lives in the store: models/ORG--NAME (repo ids cannot contain '--')."""
    return models_dir() / repo_id.replace("/", "--")


def unfinished_directory(target: Path) -> Path:
    """Where a download into ``target`` collects its files until they are complete and checked."""
    return target.with_name(f".{target.name}.download")


def download(repo_id: str, *, revision: str | None = None, include: Sequence[str] = (),
             exclude: Sequence[str] = (), gguf_file: str | None = None) -> Path:
    """Download ``repo_id`` (config, tokenizer, and safetensors weights or one GGUF file) into the
    store, unless the store already has that commit; return its directory."""
    if not REPO_ID.fullmatch(repo_id):
        raise ModelNotFoundError(f"{repo_id!r} is not a Hugging Face repo id (ORG/NAME)")
    try:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import OfflineModeIsEnabled
    except ImportError:
        raise InfluenceError(f"downloading {repo_id} needs huggingface_hub, which is not installed: "
                             "pip install 'influence[hub]'") from None
    target = store_directory(repo_id)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except OfflineModeIsEnabled:
        if read_manifest(target) is None:
            raise InfluenceError(f"{repo_id} is not in the store, and HF_HUB_OFFLINE is set, so it cannot be "
                                 "downloaded; unset HF_HUB_OFFLINE to download it") from None
        print(f"influence: {repo_id} is in the store ({target}); HF_HUB_OFFLINE is set, so it was not checked "
              "for a newer revision", file=sys.stderr)
        return target
    except Exception as error:
        raise _explain(error, repo_id, revision) from None

    allow, ignore, files = choose_files(repo_id, info, include, exclude, gguf_file)
    manifest = read_manifest(target)
    if manifest is not None and manifest.get("commit") == info.sha and manifest.get("files") == files:
        print(f"influence: {repo_id} is up to date in the store ({target})", file=sys.stderr)
        return target

    if (target.exists() or target.is_symlink()) and not made_here(target, models_dir()):
        raise InfluenceError(f"{target} is in the way of downloading {repo_id}, and Influence did not make it; "
                             "move it away and run again")
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or ()}
    print(f"influence: downloading {repo_id} (commit {info.sha[:12]}, {len(files)} files, "
          f"{format_size(sum(sizes[f] for f in files))}) into {target}; later runs load it from there",
          file=sys.stderr)
    partial = unfinished_directory(target)
    _start_unfinished(partial, repo_id, info.sha)
    _download_into(partial, repo_id, info, allow, ignore, files)
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping
    _write_manifest(partial, {
        "repo": repo_id, "revision": revision or "main", "commit": info.sha, "files": files,
        **({"gguf_file": gguf_file} if gguf_file else {}),
        "endpoint": constants.ENDPOINT, "downloaded": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    if target.exists() or target.is_symlink():
        remove_entries(target)  # an older download; refused if the store did not make it
    partial.rename(target)
    return target


def _start_unfinished(partial: Path, repo_id: str, commit: str) -> None:
    """Create (or resume) the unfinished download, marked as the store's own from the start, so
    `influence models rm` may delete it and nothing else."""
    if (partial.exists() or partial.is_symlink()) and not made_here(partial, models_dir()):
        raise InfluenceError(f"{partial} is in the way of downloading {repo_id}, and Influence did not make it; "
                             "move it away and run again")
    partial.mkdir(parents=True, exist_ok=True)
    _write_manifest(partial, {"repo": repo_id, "commit": commit, "unfinished": True})


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def choose_files(repo_id: str, info: Any, include: Sequence[str], exclude: Sequence[str],
                 gguf_file: str | None) -> tuple[list[str], list[str], list[str]]:
    """The allow and ignore patterns for snapshot_download, and the repo files they select.

    Refuses, before anything is downloaded, a repo whose only weights are pickles, and one
    without weights Influence can load."""
    from huggingface_hub.utils import filter_repo_objects

    names = [sibling.rfilename for sibling in info.siblings or ()]
    ggufs = [name for name in names if name.endswith(".gguf")]
    if gguf_file is not None and gguf_file not in ggufs:
        raise ModelNotFoundError(f"{repo_id} has no GGUF file {gguf_file!r} "
                                 f"(its GGUF files: {', '.join(ggufs) or 'none'})")
    weights = [gguf_file] if gguf_file else list(SAFETENSORS_PATTERNS)
    allow = [*CONFIG_FILES, *weights, *include]
    ignore = [*exclude, *PICKLE_PATTERNS]
    files = sorted(filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore))
    if gguf_file is None and not any(name.endswith(".safetensors") for name in files):
        pickles = sorted(filter_repo_objects(names, allow_patterns=list(PICKLE_PATTERNS)))
        if pickles:
            raise ModelFormatError(
                f"{repo_id} has only pickle weights ({', '.join(pickles)}); Influence refuses them because "
                "loading a pickle can run arbitrary code. Look for a safetensors or GGUF version of this model.")
        if ggufs:
            raise ModelFormatError(f"{repo_id} has no safetensors weights; download one of its GGUF files with "
                                   f"`influence download -m {repo_id} --file FILE`: {', '.join(ggufs)}")
        raise ModelFormatError(f"{repo_id} has no weights Influence can load (*.safetensors or a .gguf file)")
    return allow, ignore, files


def _download_into(partial: Path, repo_id: str, info: Any, allow: list[str], ignore: list[str],
                   files: list[str]) -> None:
    """Fetch the files into ``partial`` and check them. An interrupted transfer leaves ``partial`` for
    the next attempt to resume; any other failure deletes it."""
    from huggingface_hub import snapshot_download

    try:
        # The commit, not the branch: every file comes from the commit the file list was made from.
        snapshot_download(repo_id, revision=info.sha, allow_patterns=allow, ignore_patterns=ignore,
                          local_dir=partial)
        check_hashes(partial, repo_id, info, files)
    except BaseException as error:
        if not _interrupted(error):
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, (InfluenceError, KeyboardInterrupt)):
            raise
        raise _explain(error, repo_id, info.sha) from None


def check_hashes(directory: Path, repo_id: str, info: Any, files: list[str]) -> None:
    """Compare each file with the hub's hash of it: sha256 for large (LFS) files, the git blob hash
    for the others. huggingface_hub checks sizes only."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    for sibling in info.siblings or ():
        if sibling.rfilename not in files:
            continue
        path = directory / sibling.rfilename
        if sibling.lfs is not None:
            with path.open("rb") as file:
                expected, actual = sibling.lfs.sha256, sha_fileobj(file).hex()
        else:
            expected, actual = sibling.blob_id, git_hash(path.read_bytes())
        if expected is not None and actual != expected:
            raise ModelFormatError(f"{repo_id}: {sibling.rfilename} does not match the hub's hash of it "
                                   "(corrupted in transit?); the download was discarded, run it again")


def _interrupted(error: BaseException) -> bool:
    import requests
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (isinstance(error, (KeyboardInterrupt, requests.ConnectionError, requests.Timeout,
                               requests.exceptions.ChunkedEncodingError))
            and not isinstance(error, OfflineModeIsEnabled))


def _explain(error: Exception, repo_id: str, revision: str | None) -> InfluenceError:
    """One line for a huggingface_hub or network error (theirs span several lines)."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{constants.ENDPOINT}/{repo_id}"
    if isinstance(error, GatedRepoError):
        if get_token() is None:
            return InfluenceError(f"{repo_id} is gated: accept its terms at {page}, then set HF_TOKEN to an access "
                                  "token of that account")
        return InfluenceError(f"{repo_id} is gated, and the token in HF_TOKEN has no access to it: accept its "
                              f"terms at {page} with the token's account")
    if isinstance(error, RepositoryNotFoundError):
        return ModelNotFoundError(f"{repo_id} was not found on {constants.ENDPOINT}; check the name (ORG/NAME), "
                                  "and set HF_TOKEN if it is a private repo")
    if isinstance(error, RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no revision {revision!r}")
    if isinstance(error, HFValidationError):
        return ModelNotFoundError(f"{repo_id!r} is not a valid Hugging Face repo id (ORG/NAME)")
    if isinstance(error, OfflineModeIsEnabled):
        return InfluenceError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded")
    if _interrupted(error):
        return InfluenceError(f"the connection to {constants.ENDPOINT} failed while downloading {repo_id}; "
                              "run it again: the download resumes where it stopped")
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return InfluenceError(f"the hub answered {error.response.status_code} for {repo_id}: "
                              f"{_first_line(error)}")
    return InfluenceError(f"the download of {repo_id} failed: {_first_line(error)}")


def _first_line(error: Exception) -> str:
    return next((line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()),
                type(error).__name__)
