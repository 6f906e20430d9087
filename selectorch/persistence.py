"""Save and load fitted scores: tensors plus a checked JSON header.

A save is a directory::

    my_selector/
        selectorch.json      # header: versions, score class and hyperparameters, shapes, checksums
        state.pt             # torch.save of the score's tensors (a state_dict, nothing else)
        hnsw_index.bin       # only for KNNScore(backend="hnsw"): the graph, with its own
        hnsw_index.bin.json  # fingerprint (selectorch.search.hnsw), so it is not rebuilt

Loading reads the header first and refuses, with a :class:`PersistenceError` that says why:

* a path that is a file and not such a directory (an unknown file is never unpickled);
* a header that is not valid JSON, comes from another format, or from a selectorch version
  with another ``major.minor`` (:func:`compatible_version`);
* a file whose size or SHA-256 differs from the header's (truncated or altered), or that the
  header does not list;
* a tensor file holding anything but tensors: it is read with ``torch.load(...,
  weights_only=True)``, which builds tensors and plain containers and never calls code named
  in the file (a pickle with a ``__reduce__`` payload is refused, not run);
* a score class that is not registered (classes are only looked up in the score registry,
  never imported by name), or hyperparameters it does not accept;
* for a :class:`~selectorch.SelectiveModel` (:mod:`selectorch.persistence_model`): a model of
  another class or with other weights (checksum), a layer the model lacks, or a layer whose
  width differs from the fitted state's.

The checksum detects accidents (truncation, bit rot, a file replaced by another), not an
attacker, who can rewrite the header too; what protects against a hostile file is that nothing
in it is ever executed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from selectorch._version import __version__
from selectorch.memory import check_fits, tensor_nbytes
from selectorch.scores.base import Score
from selectorch.scores.registry import get_score_class

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HEADER_FILE",
    "STATE_FILE",
    "PersistenceError",
    "check_files",
    "compatible_version",
    "file_sha256",
    "load_score",
    "read_header",
    "rebuild_score",
    "save_score",
    "write_save",
]

FORMAT = "selectorch"
FORMAT_VERSION = 1
HEADER_FILE = "selectorch.json"
STATE_FILE = "state.pt"
INDEX_FILE = "hnsw_index.bin"
#: The only files a save may list: anything else in a header is refused.
KNOWN_FILES = (STATE_FILE, INDEX_FILE, INDEX_FILE + ".json")
#: A header is small; a larger file is not one (and is not parsed).
MAX_HEADER_BYTES = 4 * 1024 * 1024
_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    """A JSON-safe hyperparameter: a plain scalar, or a list/tuple of numbers (ODIN's ``std``)."""
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )


class PersistenceError(ValueError):
    """A save directory was refused: not a save, truncated or altered, from an incompatible
    version, carrying something other than tensors, or not made for the given model."""


# -- versions, checksums, JSON ---------------------------------------------------------------


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def compatible_version(saved: str, current: str = __version__) -> bool:
    """Whether a save written by selectorch ``saved`` loads in ``current``: same major.minor.

    Example:
        >>> compatible_version("0.1.3", "0.1.0"), compatible_version("0.2.0", "0.1.0")
        (True, False)
    """
    a, b = _major_minor(saved), _major_minor(current)
    return a is not None and a == b


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Cannot write a {type(obj).__name__} into a selectorch header.")


def _dtype(name: Any, where: str) -> torch.dtype:
    value = (
        getattr(torch, str(name).removeprefix("torch."), None) if isinstance(name, str) else None
    )
    if not isinstance(value, torch.dtype):
        raise PersistenceError(f"The header gives {where} the unknown dtype {name!r}.")
    return value


# -- what a header says about a score ---------------------------------------------------------


def _hparams(score: Score) -> dict[str, Any]:
    """Every constructor argument of ``score`` as a plain JSON value, or an error naming it."""
    params = inspect.signature(type(score).__init__).parameters
    out: dict[str, Any] = {}
    for name, param in params.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(score, name, inspect.Parameter.empty)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if value is inspect.Parameter.empty or not _is_plain(value):
            raise PersistenceError(
                f"Cannot save {type(score).__name__}: its argument `{name}` is not stored on the "
                f"score as a plain value (got {type(value).__name__}), so it could not be "
                "rebuilt on load. Save its state_dict() instead."
            )
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _score_header(score: Score) -> dict[str, Any]:
    name = type(score).registry_name
    if not name:
        raise PersistenceError(
            f"Cannot save a {type(score).__name__}: only registered scores (see "
            "selectorch.list_scores()) can be rebuilt on load. Save its state_dict() instead."
        )
    if get_score_class(name) is not type(score):
        raise PersistenceError(
            f"Cannot save a {type(score).__name__}: the registry name {name!r} now points to "
            f"{get_score_class(name).__name__}."
        )
    extra = score.get_extra_state()
    return {
        "class": name,
        "class_name": type(score).__name__,
        "hparams": _hparams(score),
        "extra_state": extra,
        "dtype": str(score.threshold_.dtype),
        "fitted": score.is_fitted,
        "calibrated": score.is_calibrated,
        "feature_dim": score._expected_dim(),
    }


def _tensor_state(score: Score) -> dict[str, torch.Tensor]:
    state = score.state_dict()
    return {
        key: value.detach().cpu().contiguous()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


# -- writing ----------------------------------------------------------------------------------


def _is_save_dir(path: Path) -> bool:
    return path.is_dir() and (path / HEADER_FILE).is_file()


def write_save(path: str | os.PathLike[str], score: Score, extra: dict[str, Any]) -> Path:
    """Write ``score``'s tensors, its hnsw index if any, and the header, atomically."""
    if getattr(score, "sharded_buffers", ()):
        raise PersistenceError(
            f"Cannot save a {type(score).__name__} built with shard=True here: each rank holds "
            "only its slice of the bank. Call selectorch.distributed.save_sharded(module, path) "
            "on every rank (one file per rank plus a header); load_sharded loads it on any "
            "number of ranks."
        )
    refusal = getattr(score, "save_refusal", None)
    if refusal:
        raise PersistenceError(f"Cannot save to '{os.fspath(path)}': {refusal}")
    path = Path(path)
    if path.exists() and not _is_save_dir(path):
        raise FileExistsError(
            f"'{path}' exists and is not a selectorch save directory (no {HEADER_FILE}); "
            "refusing to overwrite it. Pass a new path."
        )
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "selectorch_version": __version__,
        "torch_version": torch.__version__,
        "score": _score_header(score),
        **extra,
    }
    state = _tensor_state(score)
    header["tensors"] = {
        key: {"shape": list(t.shape), "dtype": str(t.dtype)} for key, t in state.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        torch.save(state, tmp / STATE_FILE)
        index = getattr(score, "hnsw_index", None)
        if index is not None:
            index.save(tmp / INDEX_FILE)
        header["files"] = {
            f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(tmp.iterdir())
        }
        text = json.dumps(header, indent=1, default=_json_default)
        (tmp / HEADER_FILE).write_text(text, encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_score(score: Score, path: str | os.PathLike[str]) -> Path:
    """Save a score (fitted or not) to the directory ``path``; see :meth:`Score.save`."""
    return write_save(path, score, {"kind": "score"})


# -- reading ----------------------------------------------------------------------------------


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the header of a save directory (versions and format; not the files).

    Args:
        path: A directory written by :meth:`Score.save` or :meth:`SelectiveModel.save`.

    Returns:
        The header as a dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PersistenceError: ``path`` is not a save directory, its header is not valid JSON, or
            comes from another format or an incompatible selectorch version.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No selectorch save at '{path}'.")
    if not path.is_dir():
        raise PersistenceError(
            f"'{path}' is a file, not a selectorch save directory (Score.save and "
            f"SelectiveModel.save write a directory holding {HEADER_FILE} and {STATE_FILE}). "
            "It was not opened: unpickling an unknown file can run code."
        )
    header_path = path / HEADER_FILE
    if not header_path.is_file():
        raise PersistenceError(
            f"'{path}' is not a selectorch save directory: it holds no {HEADER_FILE}."
        )
    size = header_path.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise PersistenceError(
            f"The header '{header_path}' has {size} bytes, more than a header can have "
            f"({MAX_HEADER_BYTES}); it was not parsed."
        )
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PersistenceError(
            f"The header '{header_path}' is not valid JSON (truncated or altered)."
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PersistenceError(f"The header '{header_path}' is not a selectorch header.")
    version = header.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise PersistenceError(
            f"'{path}' uses save format {version!r}; this selectorch ({__version__}) reads "
            f"format {FORMAT_VERSION}. Load it with the selectorch version that wrote it."
        )
    saved = header.get("selectorch_version")
    if not compatible_version(str(saved)):
        raise PersistenceError(
            f"'{path}' was written by selectorch {saved}; this is selectorch {__version__}, "
            "and saves only load in the same major.minor version. Load it with selectorch "
            f"{saved}, or fit and save again with this version."
        )
    for key in ("score", "tensors", "files"):
        if not isinstance(header.get(key), dict):
            raise PersistenceError(f"The header '{header_path}' has no valid `{key}` entry.")
    return header


def check_files(path: Path, header: dict[str, Any]) -> None:
    files = header["files"]
    if STATE_FILE not in files:
        raise PersistenceError(f"The header of '{path}' lists no {STATE_FILE}.")
    for name, meta in files.items():
        if name not in KNOWN_FILES or not isinstance(meta, dict):
            raise PersistenceError(
                f"The header of '{path}' lists an unexpected file {name!r}; a save holds only "
                f"{list(KNOWN_FILES)}."
            )
        file = path / name
        if not file.is_file():
            raise PersistenceError(f"'{path}' is incomplete: {name} is missing.")
        size = file.stat().st_size
        if size != meta.get("bytes"):
            state = "truncated" if size < meta.get("bytes", 0) else "altered"
            raise PersistenceError(
                f"'{file}' has {size} bytes, the header says {meta.get('bytes')}: the file is "
                f"{state}. It was not loaded."
            )
        if file_sha256(file) != meta.get("sha256"):
            raise PersistenceError(
                f"The SHA-256 of '{file}' differs from the one in the header: the file was "
                "altered or replaced after it was saved. It was not loaded."
            )


def _state_bytes(header: dict[str, Any]) -> int:
    total = 0
    for key, meta in header["tensors"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list):
            raise PersistenceError(f"The header describes tensor {key!r} without a shape.")
        total += tensor_nbytes(meta["shape"], _dtype(meta.get("dtype"), f"tensor {key!r}"))
    return total


def _load_tensors(path: Path, header: dict[str, Any], device: torch.device) -> dict[str, Any]:
    # the loaded state and the buffers it is copied into are both alive for a moment
    check_fits(
        2 * _state_bytes(header),
        device,
        f"Loading the score saved at '{path}'",
        hint="Load it on another device with map_location=...",
    )
    try:
        state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except Exception as err:  # the unpickler's errors vary with the payload
        raise PersistenceError(
            f"Refused '{path / STATE_FILE}': it is not a file of tensors that can be loaded "
            "with torch.load(..., weights_only=True) (it may carry code, which is never run)."
        ) from err
    described = header["tensors"]
    if not isinstance(state, dict) or set(state) != set(described):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise PersistenceError(
            f"'{path / STATE_FILE}' holds {got}, the header lists {sorted(described)}."
        )
    for key, value in state.items():
        meta = described[key]
        if not isinstance(value, torch.Tensor) or list(value.shape) != meta["shape"]:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PersistenceError(
                f"Tensor {key!r} in '{path / STATE_FILE}' has shape {got}, the header says "
                f"{meta['shape']}."
            )
    return state


def rebuild_score(
    path: Path, header: dict[str, Any], device: torch.device, expected: type | None
) -> Score:
    info = header["score"]
    name = info.get("class")
    try:
        cls = get_score_class(str(name))
    except ValueError as err:
        raise PersistenceError(
            f"'{path}' holds a score {name!r} that is not registered in this installation "
            f"({err}). Only registered score classes are rebuilt; none is imported by name."
        ) from err
    if expected is not None and not issubclass(cls, expected):
        raise PersistenceError(
            f"'{path}' holds a {cls.__name__}; it cannot load as a {expected.__name__}. Call "
            "selectorch.scores.Score.load to load any score."
        )
    hparams = info.get("hparams")
    if not isinstance(hparams, dict) or not all(_is_plain(v) for v in hparams.values()):
        raise PersistenceError(f"The header of '{path}' has invalid hyperparameters {hparams!r}.")
    kwargs = dict(hparams)
    has_index = INDEX_FILE in header["files"]
    if has_index:
        kwargs["save_index"] = str(path / INDEX_FILE)  # loaded (and checked) by hnsw, not built
    try:
        score = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise PersistenceError(
            f"Cannot rebuild {cls.__name__}(**{hparams}) from '{path}': {err}"
        ) from err
    score.to(device=device, dtype=_dtype(info.get("dtype", "torch.float32"), "the score"))
    state = _load_tensors(path, header, device)
    state["_extra_state"] = info.get("extra_state", {})
    try:
        score.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise PersistenceError(f"The state saved at '{path}' does not load: {err}") from err
    if has_index:
        score.save_index = hparams.get("save_index")
    return score


def load_score(
    path: str | os.PathLike[str],
    *,
    map_location: torch.device | str | None = None,
    expected: type | None = None,
) -> Score:
    """Load a score saved by :meth:`Score.save`; see :meth:`Score.load`."""
    path = Path(path)
    header = read_header(path)
    check_files(path, header)
    return rebuild_score(path, header, torch.device(map_location or "cpu"), expected)
