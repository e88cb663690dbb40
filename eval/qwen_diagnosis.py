"""Why FP=xINT T=1 (defaults) lost to RTN W4 on Qwen2.5-Coder-1.5B (eval/results/mmlu_coder.md): the diagnosis.

    python eval/qwen_diagnosis.py capture   # FP model once: reference log-probs + activation statistics
    python eval/qwen_diagnosis.py layers    # per-layer errors (no model in memory)
    python eval/qwen_diagnosis.py kl        # whole-model KL of each variant, one model at a time

``capture`` runs the float32 FP model over the bench text (the same pydoc windows as eval/bench_mmlu.py) and
keeps the FP log-probs, the true second moment ``E[x_j²]`` of the input of every linear layer, and the inputs
``X`` of the layers of blocks 0, 13 and 27.  ``layers`` compares, per layer, RTN W4 and the FP=xINT T=1 variants
(same group size): weight SNR, the error weighted by the activation proxy, the error weighted by the true
``E[x_j²]``, and the true output error ``||X (W - Ŵ)ᵀ|| / ||X Wᵀ||``.  ``kl`` loads each variant (fake
quantization: the dequantized weights written into the float32 model; ``default`` also through the product's
quantize-on-load path, to check the two agree) and scores it against the saved reference.
Work files go to ``--work`` (default /tmp/qwen_diagnosis); results to eval/results/qwen_diagnosis.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fpxint_hf.evaluation.assets import fp_model_dir  # noqa: E402
from fpxint_hf.evaluation.coder_assets import coder_fp_dir  # noqa: E402
from fpxint_hf.evaluation.metrics import FPReference, evaluate_against, fp_reference, pydoc_windows  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402
from fpxint_hf.evaluation.table import quantizable_linears  # noqa: E402
from fpxint_hf.expansion import ExpandOptions, expand, reconstruct, rtn  # noqa: E402
from fpxint_hf.hf.proxy import ActivationProxy  # noqa: E402

OUT = ROOT / "eval" / "results" / "qwen_diagnosis"
MODELS = {
    "qwen": (coder_fp_dir, 128),
    "smollm2": (fp_model_dir, 64),
}  # group: bench_mmlu.py's, bench_pareto.py's
BLOCKS = (0, 13, 27)
FLOORS = (
    0.0,
    1.0,
)  # ActivationProxy gain_floor: before / after (0.1, 0.25, 0.5 were measured on SmolLM2 too)
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def load_fp(fp_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()


@torch.no_grad()
def capture(fp_dir: Path, work: Path, tokens: int, context: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fp_dir)
    windows = pydoc_windows(tok, tokens, context)
    model = load_fp(fp_dir)
    sums: dict[str, torch.Tensor] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    keep = {f"model.layers.{b}.{k}" for b in BLOCKS for k in KINDS}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":

            def hook(_m, args, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
                if name in keep:
                    inputs.setdefault(name, []).append(x.clone())

            hooks.append(m.register_forward_pre_hook(hook))
    ref = fp_reference(model, windows, batch_size=1)
    for h in hooks:
        h.remove()
    n = windows.numel()
    work.mkdir(parents=True, exist_ok=True)
    ref.save(work / "reference.pt")
    torch.save({k: v / n for k, v in sums.items()}, work / "act_second_moment.pt")
    torch.save({k: torch.cat(v) for k, v in inputs.items()}, work / "inputs.pt")
    print(f"captured {n} tokens, {len(sums)} layers -> {work}")


def weight_variants(
    w: torch.Tensor, group: int, proxies: dict[float, torch.Tensor | None], true_m2: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Dequantized weights of every layer-level variant (4 bits, one term, group ``group``); ``proxies``: the
    activation proxy of the layer for each ``gain_floor``."""

    def t1(**kw: Any) -> torch.Tensor:
        return reconstruct(expand(w, bits=4, terms=1, group_size=group, **kw))

    out = {"rtn": rtn(w, 4, group), "t1 fit=minmax": t1(fit="minmax"), "t1 act_proxy=None": t1()}
    for floor, a in proxies.items():
        out[f"t1 proxy floor={floor}"] = t1(importance=a)
    if true_m2 is not None:
        out["t1 true E[x^2] (oracle)"] = t1(importance=true_m2)
    return out


def _db(num: float, den: float) -> float:
    return math.inf if num == 0 else 10 * math.log10(den / num)


@torch.no_grad()
def layer_metrics(
    w: torch.Tensor,
    wq: torch.Tensor,
    proxy: torch.Tensor | None,
    m2: torch.Tensor | None,
    x: torch.Tensor | None,
) -> dict[str, float]:
    """SNRs in dB (higher is better): weight, proxy-weighted, true-E[x²]-weighted, true output (``X`` given)."""
    d2 = (wq - w).pow(2)
    out = {"w_snr": _db(d2.sum().item(), w.pow(2).sum().item())}
    if proxy is not None:
        out["proxy_snr"] = _db((d2 * proxy).sum().item(), (w.pow(2) * proxy).sum().item())
    if m2 is not None:
        out["act_snr"] = _db((d2 * m2).sum().item(), (w.pow(2) * m2).sum().item())
    if x is not None:
        y = x @ w.T
        out["out_snr"] = _db((x @ (wq - w).T).pow(2).sum().item(), y.pow(2).sum().item())
    return out


@torch.no_grad()
def layers(fp_dir: Path, group: int, work: Path, blocks: list[int], floors: list[float]) -> dict[str, Any]:
    from safetensors import safe_open

    files = sorted(str(p) for p in fp_dir.glob("*.safetensors"))
    config = json.loads((fp_dir / "config.json").read_text())
    proxy = {f: ActivationProxy(files, config["num_key_value_heads"], gain_floor=f) for f in floors}
    m2_all = torch.load(work / "act_second_moment.pt", weights_only=True)
    xs = torch.load(work / "inputs.pt", weights_only=True)
    key_file = {k: f for f in files for k in safe_open(f, "pt").keys()}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    start = time.perf_counter()
    for b in blocks:
        for kind in KINDS:
            name = f"model.layers.{b}.{kind}"
            with safe_open(key_file[name + ".weight"], "pt") as f:
                w = f.get_tensor(name + ".weight").float()
            a, m2 = {f: p.importance(name) for f, p in proxy.items()}, m2_all[name]
            x = xs.get(name)
            rows[name] = {
                v: layer_metrics(w, wq, a[0.0], m2, x) for v, wq in weight_variants(w, group, a, m2).items()
            }
            print(
                name, {v: {k: round(x, 2) for k, x in r.items()} for v, r in rows[name].items()}, flush=True
            )
        print(f"block {b} done ({time.perf_counter() - start:.0f} s)", flush=True)
        (work / f"layers_{b}.json").write_text(
            json.dumps({k: v for k, v in rows.items() if f".{b}." in k}, indent=1)
        )
    return rows


def variant_model(fp_dir: Path, group: int, variant: str, work: Path) -> tuple[torch.nn.Module, float]:
    """The float32 model of one whole-model variant (see ``VARIANTS``) and its quantization seconds."""
    from transformers import AutoModelForCausalLM

    from fpxint_hf import FPxINTConfig

    start = time.perf_counter()
    if variant.startswith("product"):  # the quantize-on-load path, FPxINTLinear's dense forward
        proxy = variant.partition(":")[2]  # product:<act_proxy>; bare "product": the default
        extra = {"act_proxy": None if proxy == "none" else proxy} if proxy else {}
        cfg = FPxINTConfig(bits=4, terms=1, group_size=group, **extra)
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, dtype=torch.float32)
        return model.eval(), time.perf_counter() - start
    model = load_fp(fp_dir)
    files = sorted(str(p) for p in fp_dir.glob("*.safetensors"))
    kv = getattr(model.config, "num_key_value_heads", None)
    kind, _, arg = variant.partition(":")
    proxy = ActivationProxy(files, kv, gain_floor=float(arg)) if kind in PROXY_KINDS else None
    leaves = PROXY_KINDS.get(kind, ())
    oracle = torch.load(work / "act_second_moment.pt", weights_only=True) if kind == "oracle" else {}
    with torch.no_grad():
        for name, lin in quantizable_linears(model):
            w = lin.weight.float()
            if kind == "rtn":
                wq = rtn(w, 4, group)
            elif kind == "minmax":
                wq = reconstruct(expand(w, bits=4, terms=1, group_size=group, fit="minmax"))
            else:  # "none", the proxy (gain floor c) on the layers PROXY_KINDS names, or the oracle E[x²]
                use = proxy is not None and name.rpartition(".")[2] in leaves
                a = proxy.importance(name) if use else oracle.get(name)
                wq = reconstruct(
                    expand(w, options=ExpandOptions(importance=a), bits=4, terms=1, group_size=group)
                )
            lin.weight.copy_(wq)
    return model, time.perf_counter() - start


PROXY_KINDS = {
    "floor": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "normfed": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),  # the proxy where it is a norm gain
    "outproj": ("o_proj", "down_proj"),  # the proxy where it is built from the neighbouring weights
}
VARIANTS = (
    "rtn",
    "minmax",
    "none",
    "floor:0.0",
    "product",
    "normfed:1.0",
    "outproj:1.0",
    "oracle",
    "product:probe",
)
VARIANT_LEGEND = (
    "rtn: min-max round-to-nearest W4; minmax: FP=xINT T=1 with fit='minmax' (the series' grid on the min-max "
    "range, no clip search); none: the optimized fit (clip search + least squares) without the activation proxy; "
    "floor:c: the optimized fit weighted by the norm proxy with gain floor c (normfed:c: on q/k/v/gate/up only, "
    "the layers that read a norm's output; outproj:c: on o_proj/down_proj only); oracle: the optimized fit "
    "weighted by the true E[x_j^2] of each layer's input, measured on the same tokens the KL is scored on (a "
    "ceiling for any data-free proxy, optimistic: in-sample); product: FPxINTConfig(bits=4, "
    "terms=1) through quantize-on-load (the optimized fit, proxy floor 1.0: today's default T=1); product:probe: "
    "the same with act_proxy='probe' (the FP model's input energies on 128 random token ids, no data)."
)


def kl(fp_dir: Path, group: int, work: Path, variants: list[str]) -> dict[str, Any]:
    ref = FPReference.load(work / "reference.pt")
    path = work / "kl.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for v in variants:
        model, secs = variant_model(fp_dir, group, v, work)
        q = evaluate_against(model, ref)
        out[v] = {"kl": q.kl_vs_fp, "ppl": q.perplexity, "top1": q.top1_agreement, "n": q.n_tokens,
                  "quantize_s": secs}  # fmt: skip
        print(v, out[v], flush=True)
        path.write_text(json.dumps(out, indent=1))
        del model
        gc.collect()
    return out


def kind_table(rows: dict[str, dict[str, dict[str, float]]], metric: str) -> dict[str, dict[str, float]]:
    """``{kind: {variant: mean of metric over the measured blocks}}`` (layers without the metric skipped)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for name, variants in rows.items():
        kind = name.rsplit(".", 1)[-1]
        for v, m in variants.items():
            if metric in m:
                acc.setdefault(kind, {}).setdefault(v, []).append(m[metric])
    return {k: {v: sum(x) / len(x) for v, x in vs.items()} for k, vs in acc.items()}


def report(work: Path, out: Path) -> None:
    """eval/results/qwen_diagnosis.{json,md} from the work files of both models (a model without them is empty)."""
    data: dict[str, Any] = {}
    for model in MODELS:
        rows: dict[str, Any] = {}
        for f in sorted((work / model).glob("layers_*.json")):
            rows.update(json.loads(f.read_text()))
        klp = work / model / "kl.json"
        data[model] = {"group_size": MODELS[model][1], "layers": rows,
                       "kl": json.loads(klp.read_text()) if klp.exists() else {}}  # fmt: skip
    write_results(out, data, to_markdown)


def to_markdown(data: dict[str, Any]) -> str:
    """The markdown of ``report``'s JSON: per-layer SNR tables (where measured) and the whole-model KL table."""
    lines = ["# Why FP=xINT T=1 lost to RTN W4 on Qwen2.5-Coder-1.5B", ""]
    for model, d in data.items():
        rows, group = d["layers"], d["group_size"]
        blocks = sorted({int(n.split(".")[2]) for n in rows})
        for metric, what in (
            ("act_snr", "error weighted by the true E[x_j²]"),
            ("out_snr", "true output SNR"),
        ):
            table = kind_table(rows, metric)
            if not table:
                continue
            variants = list(next(iter(table.values())))
            shown = blocks if metric == "act_snr" else [b for b in blocks if b in BLOCKS]
            lines += [f"## {model}, g{group}: {what}, dB (higher is better), mean over blocks {shown}", "",
                      "| layer | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]  # fmt: skip
            for kind, vs in table.items():
                best = max(vs.values())
                cells = [f"**{x:.2f}**" if x == best else f"{x:.2f}" for x in vs.values()]
                lines.append(f"| {kind} | " + " | ".join(cells) + " |")
            lines.append("")
        if d["kl"]:
            lines += [f"## {model}: whole model, T=1 g{group} (float32)", "",
                      "| variant | KL vs FP (nats) | PPL | top-1 vs FP | tokens |", "|---|---:|---:|---:|---:|"]  # fmt: skip
            for v, r in d["kl"].items():
                lines.append(f"| {v} | {r['kl']:.4f} | {r['ppl']:.3f} | {100 * r['top1']:.2f}% | {r['n']} |")
            lines += ["", VARIANT_LEGEND, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("capture", "layers", "kl", "report"))
    ap.add_argument("--model", choices=tuple(MODELS), default="qwen")
    ap.add_argument("--work", default="/tmp/qwen_diagnosis", help="folder for the reference and activations")
    ap.add_argument("--tokens", type=int, default=512, help="pydoc tokens (capture; default 512)")
    ap.add_argument("--context", type=int, default=256, help="window length (capture; default 256)")
    ap.add_argument("--blocks", default=",".join(map(str, BLOCKS)), help="layers: blocks to measure")
    ap.add_argument("--variants", default=None, help="kl: comma list of variants (default: all)")
    ap.add_argument("--out", default=str(OUT), help="output prefix (.json, .md)")
    args = ap.parse_args(argv)
    find_dir, group = MODELS[args.model]
    fp_dir, work = Path(find_dir()), Path(args.work) / args.model
    if args.step == "capture":
        capture(fp_dir, work, args.tokens, args.context)
    elif args.step == "layers":
        blocks = [int(b) for b in args.blocks.split(",")]
        layers(fp_dir, group, work, blocks, list(FLOORS))  # writes layers_<block>.json
    elif args.step == "report":
        report(Path(args.work), Path(args.out))
    elif args.step == "kl":
        kl(fp_dir, group, work, args.variants.split(",") if args.variants else list(VARIANTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
