"""GGUF files as a starting model: convert once into a cached Hugging Face folder, then load it as usual.

transformers reads a ``.gguf`` (``from_pretrained(folder, gguf_file=name)``) and dequantises it to
float ``nn.Linear`` weights, but the loaded model keeps its GGUF quantizer: ``save_pretrained``
refuses it and peft treats it as quantized. So instead of loading GGUF at every site, every site
calls :func:`resolve_model_path`, which converts the file once into a plain float32 safetensors
folder (config, weights, tokenizer with its chat template) and returns that folder. Training, eval,
chat and export then load a normal Hugging Face model with their usual dtype rule.

Cache: ``$INSTRUCTKIT_CACHE/gguf/<stem>-<sha256[:12]>/`` (default ``~/.cache/instructkit``). The key
is the file's content hash, so an edited file converts again; each folder carries
``instructkit_gguf.json`` (where it came from, and with which library versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from instructkit.models import ModelError

GGUF_MAGIC = b"GGUF"
PROVENANCE_FILE = "instructkit_gguf.json"

# llama.cpp names a few architectures differently from transformers' GGUF loader, which maps them
# (modeling_gguf_pytorch_utils.load_gguf_checkpoint); the support check has to do the same.
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                 "t5encoder": "t5"}

# (resolved path, size, mtime_ns) -> converted folder: later calls in the same process skip the hash.
_RESOLVED: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """instructkit's per-user cache folder: ``$INSTRUCTKIT_CACHE``, else ``~/.cache/instructkit``."""
    return Path(os.environ.get("INSTRUCTKIT_CACHE") or Path.home() / ".cache" / "instructkit").expanduser()


def find_gguf(name_or_path: str | Path) -> Path | None:
    """The GGUF file ``name_or_path`` names, or None when it names something else (hub id, HF folder).

    A ``.gguf`` path, or a folder with no ``config.json`` holding exactly one ``.gguf``, counts.

    Raises:
        ModelError: a ``.gguf`` path that does not exist, or a folder with several ``.gguf`` files.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}. Fix: check model.name_or_path / --model")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        listing = "\n  ".join(str(p) for p in files)
        raise ModelError(f"{path} holds {len(files)} GGUF files and no config.json:\n  {listing}\n"
                         f"Fix: name one of them as the model path (e.g. {files[0]})")
    return files[0] if files else None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's contents, read in 4 MiB blocks (about 0.3 s per 100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def supported_architectures() -> list[str]:
    """GGUF ``general.architecture`` values the installed transformers can load (empty if unknown)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:  # transformers >= 5.23 loads some architectures through a second, newer path
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})


def inspect_gguf(path: Path) -> dict:
    """Architecture and quantisation of a GGUF file, checked before any weights are read.

    Returns:
        ``{"architecture", "file_type", "quant_types": {type: tensor count}, "name"}``.

    Raises:
        ModelError: not a GGUF file (bad magic), the ``gguf`` package missing, or an architecture
            the installed transformers cannot load.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}. Fix: check the "
                         f"download (an HTML error page or a Git LFS pointer is a common cause) or point at a real "
                         f".gguf file")
    try:
        import gguf
    except ImportError:
        raise ModelError(f"{path} is a GGUF file, and reading it needs the `gguf` package. Fix: "
                         f"pip install 'instructkit[gguf]'") from None
    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = str(field("general.architecture") or "")
    quant: dict[str, int] = {}
    for t in reader.tensors:
        quant[t.tensor_type.name] = quant.get(t.tensor_type.name, 0) + 1
    file_type = field("general.file_type")
    try:
        ft_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        ft_name = None
    if ft_name:
        ft_name = ft_name.removeprefix("MOSTLY_").removeprefix("ALL_")  # MOSTLY_Q4_1 -> Q4_1
    supported = supported_architectures()
    if supported and arch not in supported and _ARCH_ALIASES.get(arch, arch) not in supported:
        raise ModelError(f"{path}: GGUF architecture '{arch}' cannot be loaded by transformers (supported: "
                         f"{', '.join(supported)}). Fix: use the model's Hugging Face checkpoint instead, or convert "
                         f"it to a Hugging Face folder with another tool; for a model you converted to GGUF yourself "
                         f"with llama.cpp's convert_hf_to_gguf.py, start from the original folder")
    main_quant = ft_name or "+".join(sorted(k for k in quant if k not in ("F32", "F16", "BF16"))) or "F32"
    return {"architecture": arch, "file_type": main_quant, "quant_types": quant,
            "name": field("general.name")}


def convert_gguf(src: str | Path, out: str | Path, quiet: bool = False) -> Path:
    """Dequantise a GGUF file into a Hugging Face folder ``out`` (float32 safetensors, tokenizer, template).

    Written to a temporary sibling and renamed, so a crash never leaves a half folder; if another
    process finished the same ``out`` first, its folder is kept.

    Args:
        src: The ``.gguf`` file.
        out: Destination folder; must not exist (or be empty).
        quiet: Skip the one-line notice on stderr.

    Returns:
        ``out``.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src).expanduser().resolve(), Path(out).expanduser()
    info = inspect_gguf(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} already exists and is not empty. Fix: choose a new folder or remove this one")
    if not quiet:
        print(f"converting {src.name} ({info['file_type']}, {info['architecture']}) to a Hugging Face folder in "
              f"{out} (once)", file=sys.stderr)
    kwargs = {}
    try:  # newer transformers may keep GGUF blocks packed; a trainable model needs them dequantised
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                     **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(f"cannot load {src} with transformers {transformers.__version__}: {e}. Fix: use the "
                         f"model's Hugging Face checkpoint instead") from None
    # The weights are plain float tensors now; the leftover quantizer only blocks saving and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    not_float = [n for n, p in model.state_dict().items() if not p.is_floating_point()]
    if not_float:
        raise ModelError(f"{src}: tensors {not_float[:5]} stayed quantized after loading; this transformers version "
                         f"cannot dequantise this file. Fix: use the model's Hugging Face checkpoint")
    model = model.float()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared model folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        st = src.stat()
        gguf_version = _version("gguf")
        provenance = {"source": str(src), "sha256": file_sha256(src), "size": st.st_size,
                      "architecture": info["architecture"], "file_type": info["file_type"],
                      "quant_types": info["quant_types"], "name": info["name"],
                      "model_class": type(model).__name__,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "transformers_version": transformers.__version__, "gguf_version": gguf_version}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        try:
            if out.exists():
                out.rmdir()  # empty when checked above (another process may have filled it since)
            os.rename(tmp, out)
        except OSError:
            if not (out / PROVENANCE_FILE).exists():  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cached_folder(src: Path, sha256: str) -> Path:
    """Where the conversion of ``src`` (with this content hash) lives in the cache."""
    return cache_root() / "gguf" / f"{src.stem}-{sha256[:12]}"


def resolve_model_path(name_or_path: str | Path) -> str:
    """A Hugging Face folder for ``name_or_path``: GGUF files are converted once and cached.

    A ``.gguf`` file, or a folder holding one ``.gguf`` and no ``config.json``, gives its cached
    converted folder (converting it on first use); anything else (hub id, HF folder) comes back
    unchanged as a string.
    """
    src = find_gguf(name_or_path)
    if src is None:
        return str(name_or_path)
    src = src.resolve()
    st = src.stat()
    memo = (str(src), st.st_size, st.st_mtime_ns)
    if memo in _RESOLVED and Path(_RESOLVED[memo]).is_dir():
        return _RESOLVED[memo]
    folder = cached_folder(src, file_sha256(src))
    if not (folder / PROVENANCE_FILE).exists():
        if folder.exists():  # an incomplete folder from an older, interrupted layout: redo it
            shutil.rmtree(folder)
        convert_gguf(src, folder)
    _RESOLVED[memo] = str(folder)
    return str(folder)


def convert_command(src: str, out: str) -> Path:
    """``instructkit convert-gguf FILE --out DIR``: the dequantised Hugging Face folder, written to ``out``."""
    path = find_gguf(src)
    if path is None:
        raise ModelError(f"{src} is not a .gguf file (or a folder holding exactly one). Fix: pass the GGUF file")
    done = convert_gguf(path, out)
    info = json.loads((done / PROVENANCE_FILE).read_text())
    print(f"wrote {done}: {info['model_class']}, {info['parameters']:,} parameters (float32), tokenizer and "
          f"chat template")
    return done
