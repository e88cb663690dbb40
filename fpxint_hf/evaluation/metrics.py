"""Quality of a (quantized) model against the FP reference on a fixed pydoc token budget.

The way llama.cpp's ``perplexity --kl-divergence`` judges quant types: run both models over the same tokens and
report the model's perplexity, the mean KL divergence KL(P_fp || P_model) of the next-token distributions (nats)
and how often both models put the same token first ("top-1 agreement", llama.cpp's "same top p").

Protocol: the text of :func:`fpxint_hf.evaluation.assets.pydoc_text` is tokenized once (no special tokens); the first
``n_tokens`` tokens are cut into ``n_tokens // context`` non-overlapping windows of ``context`` tokens; each
window is scored on its ``context - 1`` next-token predictions (no BOS is inserted, no cross-window context).
All log-softmaxes are taken in float32. The FP side is computed once (:func:`fp_reference`) and reused for any
number of models; it can be saved and memory-mapped back (:meth:`FPReference.save` / :meth:`FPReference.load`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .assets import pydoc_text

logger = logging.getLogger(__name__)

DEFAULT_TOKENS = 8192
DEFAULT_CONTEXT = 512
DEFAULT_BATCH = 4


@dataclass(frozen=True)
class QualityMetrics:
    """Scores of one model on the reference tokens."""

    perplexity: float
    """exp(mean negative log-likelihood of the actual next tokens) under the model."""
    kl_vs_fp: float
    """mean over scored positions of KL(P_fp || P_model), in nats."""
    top1_agreement: float
    """fraction of scored positions where the model's argmax equals the FP model's argmax."""
    n_tokens: int
    """number of scored positions (next-token predictions)."""

    def summary(self) -> str:
        """One line for logs and tables."""
        return (
            f"PPL={self.perplexity:.4f}  KL(FP||model)={self.kl_vs_fp:.5f} nats  "
            f"top1={100 * self.top1_agreement:.2f}%  (n={self.n_tokens})"
        )

    def to_json(self) -> dict[str, Any]:
        """All fields as a JSON-able dict."""
        return asdict(self)


@dataclass
class FPReference:
    """FP next-token log-probs on fixed windows, computed once and reused for every quantized model.

    ``log_probs`` is chunked (one ``[b, T-1, vocab]`` tensor per batch of ``batch_size`` windows) so that no
    single huge tensor is ever materialised; memory is ``n_tokens * vocab * itemsize`` in total (about 1.6 GB
    for SmolLM2 at 8192 tokens in float32), or less with ``store_dtype=torch.bfloat16`` or a memory-mapped
    :meth:`load`."""

    windows: torch.Tensor
    """``[W, T]`` int64 token ids."""
    log_probs: list[torch.Tensor]
    """FP log-probs for positions ``0..T-2`` of each window, chunked by ``batch_size`` windows."""
    top1: torch.Tensor
    """``[W, T-1]`` FP argmax at each scored position."""
    nll: torch.Tensor
    """``[W, T-1]`` float64 FP negative log-likelihood of the actual next token."""
    batch_size: int

    @property
    def n_tokens(self) -> int:
        """Number of scored positions."""
        return int(self.top1.numel())

    @property
    def perplexity(self) -> float:
        """Perplexity of the FP model itself on the scored positions."""
        return math.exp(float(self.nll.mean()))

    def chunks(self) -> list[tuple[slice, torch.Tensor]]:
        """(window slice, FP log-prob chunk) pairs."""
        out, start = [], 0
        for chunk in self.log_probs:
            out.append((slice(start, start + chunk.shape[0]), chunk))
            start += chunk.shape[0]
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to one ``torch.save`` file (reload with :meth:`load`, memory-mapped)."""
        torch.save(
            {
                "windows": self.windows,
                "log_probs": self.log_probs,
                "top1": self.top1,
                "nll": self.nll,
                "batch_size": self.batch_size,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = True) -> FPReference:
        """Read a file written by :meth:`save`; with ``mmap`` the log-probs stay on disk until touched."""
        data = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        return cls(**data)


def pydoc_windows(
    tokenizer: Any, n_tokens: int = DEFAULT_TOKENS, context: int = DEFAULT_CONTEXT, text: str | None = None
) -> torch.Tensor:
    """Tokenize the pydoc text once and cut its first ``n_tokens`` tokens into ``[n_tokens // context,
    context]`` non-overlapping windows (int64)."""
    if context < 2 or n_tokens < context:
        raise ValueError(f"need context >= 2 and n_tokens >= context, got {n_tokens=} {context=}")
    text = pydoc_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_windows = n_tokens // context
    if len(ids) < n_windows * context:
        raise ValueError(f"text has {len(ids)} tokens, fewer than {n_windows} windows of {context}")
    return torch.tensor(ids[: n_windows * context], dtype=torch.long).view(n_windows, context)


def _device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@torch.no_grad()
def _log_probs(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """float32 next-token log-probs ``[b, T-1, vocab]`` for positions ``0..T-2`` of each window."""
    logits = model(input_ids=windows.to(_device(model)), use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _nll(log_probs: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    target = windows[:, 1:].to(log_probs.device)
    return -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double().cpu()


@torch.no_grad()
def fp_reference(
    fp_model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = DEFAULT_BATCH,
    store_dtype: torch.dtype = torch.float32,
) -> FPReference:
    """Run the FP model once over ``windows`` (see :func:`pydoc_windows`) and keep what the metrics need."""
    was_training = fp_model.training
    fp_model.eval()
    chunks, top1, nll = [], [], []
    try:
        for start in tqdm(
            range(0, windows.shape[0], batch_size), desc="FP reference", leave=False, disable=None
        ):
            batch = windows[start : start + batch_size]
            lp = _log_probs(fp_model, batch)
            top1.append(lp.argmax(-1).cpu())
            nll.append(_nll(lp, batch))
            chunks.append(lp.to(device="cpu", dtype=store_dtype))
    finally:
        fp_model.train(was_training)
    return FPReference(windows.cpu(), chunks, torch.cat(top1), torch.cat(nll), batch_size)


@torch.no_grad()
def evaluate_against(model: torch.nn.Module, reference: FPReference) -> QualityMetrics:
    """Perplexity, mean KL(FP || model) and top-1 agreement of ``model`` on the reference windows."""
    was_training = model.training
    model.eval()
    kl_sum, nll_sum, agree = 0.0, 0.0, 0
    try:
        for rows, fp_chunk in tqdm(reference.chunks(), desc="quality vs FP", leave=False, disable=None):
            batch = reference.windows[rows]
            lq = _log_probs(model, batch)
            lp = fp_chunk.to(device=lq.device, dtype=torch.float32)
            # KL(P || Q) = sum_v p (log p - log q); terms with p == 0 contribute 0 (avoid 0 * inf = nan).
            kl = torch.where(lp > -math.inf, lp.exp() * (lp - lq), 0.0).sum(-1)
            kl_sum += float(kl.double().sum())
            nll_sum += float(_nll(lq, batch).sum())
            agree += int((lq.argmax(-1).cpu() == reference.top1[rows]).sum())
            del lq, lp, kl
    finally:
        model.train(was_training)
    n = reference.n_tokens
    return QualityMetrics(math.exp(nll_sum / n), kl_sum / n, agree / n, n)


def quality_metrics(
    model: torch.nn.Module,
    reference: FPReference | torch.nn.Module,
    tokenizer: Any = None,
    *,
    n_tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    batch_size: int = DEFAULT_BATCH,
) -> QualityMetrics:
    """Metrics of ``model`` against ``reference``: a precomputed :class:`FPReference` (preferred when scoring
    several models), or the FP model itself, in which case ``tokenizer`` is required and the reference is
    built here on the pydoc budget."""
    if not isinstance(reference, FPReference):
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to build the FP reference from a model")
        windows = pydoc_windows(tokenizer, n_tokens, context)
        reference = fp_reference(reference, windows, batch_size)
    return evaluate_against(model, reference)
