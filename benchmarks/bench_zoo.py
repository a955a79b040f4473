"""Zoo: public architectures, built from small configs, through every nesc stage at ratio 4.

Every Hugging Face ``transformers`` model type of the task mappings below (image classification,
sequence classification, causal LM, seq2seq LM, audio classification, plus the T5 encoder) is built
from its default config, shrunk by one generic recipe (``small_config``: every width, depth, head,
vocabulary and position attribute the config has is set small; nothing keyed by model name), with
random weights (nothing downloads). torchvision's classification models follow when torchvision
imports (the smallest of each family by default, every one with ``--all``), at their full size on
64x64 images (``image_size=64`` where the builder takes it: the ViTs; 224x224 for a model that does not
run at 64), with 10 classes.

Stages, each depending on the one before (a stage after a failure is "skip"):

    transform  nesc.transform(model, inputs, ratio=4): the ratio reached and what stayed dense
    train      one SGD step of gm in train mode (loss: mean square of the first float output); finite
    freeze     nesc.freeze(gm) against gm.eval(): max |diff| / max |out| <= FREEZE_TOL
    save_load  nesc.save + nesc.load against the frozen model (FREEZE_TOL)
    onnx       nesc.export_onnx + onnxruntime against the frozen model (BACKEND_TOL)
    tvm        nesc.compile (llvm) against the frozen model (BACKEND_TOL)

Each model runs in its own subprocess under ``--timeout`` seconds, writing its result after every
stage, so one failing or hanging model never stops the rest and a timeout still shows where it hung.
Results already in the JSON are kept unless ``--force``.

    OMP_NUM_THREADS=1 flock /tmp/nesc-bench.lock python benchmarks/bench_zoo.py            # default families
    python benchmarks/bench_zoo.py --all --timeout 300        # every model type of the mappings
    python benchmarks/bench_zoo.py --models bert,gpt2 --force
    /tmp/nesc-torch214/bin/python benchmarks/bench_zoo.py --models tv     # torchvision (torch 2.14 venv)

Writes ``benchmarks/results/zoo.json`` and ``zoo.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("transform", "train", "freeze", "save_load", "onnx", "tvm")
RATIO = 4.0
FALLBACK_RATIO = 2.0  # after a failed transform at RATIO, what this reaches is recorded (or the ratio
# the error says is reachable, when it says one: "at most 3.69x")
FREEZE_TOL = 1e-4
BACKEND_TOL = 1e-3
# The families the issue names, as transformers model types; --all runs every type of TASKS' mappings.
DEFAULT = ("vit", "deit", "swin", "convnext", "resnet", "efficientnet", "mobilenet_v2", "regnet", "bit",
           "bert", "distilbert", "roberta", "albert", "electra", "deberta-v2", "gpt2", "llama", "mistral",
           "qwen2", "phi", "t5", "bart", "wav2vec2", "hubert", "wavlm", "whisper")
# task -> the transformers mapping of model type -> class name. The T5 encoder is added by hand (no
# task mapping holds it).
TASKS = {
    "image": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "text": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "audio": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
}
# The task a model type runs as: the first of these whose mapping holds it (a masked-LM encoder is
# never run as a causal LM).
PREFERRED = ("image", "seq2seq", "audio", "causal", "text")
# torchvision: the smallest model of each family (``--all``: every classification model it lists).
# In this order: the families the issue names first (a run cut short still covers them).
TV_DEFAULT = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "vit_b_16",
              "convnext_tiny", "densenet121", "swin_t", "squeezenet1_1", "shufflenet_v2_x0_5", "alexnet",
              "regnet_y_400mf", "mnasnet0_5", "googlenet", "resnext50_32x4d", "efficientnet_v2_s", "swin_v2_t",
              "wide_resnet50_2", "vgg11", "maxvit_t")
TV_SIZE = 64
TV_FALLBACK_SIZE = 224  # for a model that does not run at TV_SIZE
BATCH, SEQ, DEC_SEQ = 2, 16, 8

# ------------------------------------------------------------------------------- small configs

WIDTH = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim", "projection_dim",
         "pooler_hidden_size")
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers",
          "depth", "num_hidden_groups")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads")
FFN = ("intermediate_size", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim")
SMALL = {"vocab_size": 128, "max_position_embeddings": 64, "n_positions": 64, "max_source_positions": 32,
         "max_target_positions": 32, "num_labels": 3, "d_kv": 32, "head_dim": 32, "embedding_size": 32,
         "num_key_value_heads": 1, "num_mel_bins": 16, "num_conv_pos_embeddings": 16,
         "num_conv_pos_embedding_groups": 2, "image_size": 64, "patch_size": 4, "window_size": 2,
         "classifier_proj_size": 32, "conv_dim": 32, "tdnn_dim": 32, "xvector_output_dim": 32,
         "depth_coefficient": 0.25, "depth_multiplier": 0.25, "num_groups": 4,
         "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
         "use_cache": False, "rotary_dim": 8, "partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5}
LISTS = {"depths": 1, "num_heads": 2, "hidden_sizes": 16, "embed_dims": 16, "hidden_dims": 16, "neck_hidden_sizes": 16,
         "conv_dim": 32, "tdnn_dim": 32}


def small_config(config):
    """Shrink ``config`` in place by attribute name alone: widths 64, 2 layers, 2 heads, FFN 128, small
    vocabulary and positions, stage lists of depth 1 and width 16 * 2^i. Sub-configs (a text and a
    vision config inside one) are shrunk the same way."""
    for key, value in list(vars(config).items()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            small_config(value)
        elif key in LISTS and isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            base = LISTS[key]
            grow = key not in ("depths", "num_heads", "conv_dim", "tdnn_dim")
            setattr(config, key, type(value)(base * 2 ** i if grow else base for i in range(len(value))))
        elif isinstance(value, bool):
            if key in SMALL:
                setattr(config, key, SMALL[key])
        elif key in WIDTH and isinstance(value, int):
            setattr(config, key, 64)
        elif key in LAYERS and isinstance(value, int):
            setattr(config, key, 2 if key != "num_hidden_groups" else 1)
        elif key in HEADS and isinstance(value, int):
            setattr(config, key, 2)
        elif key in FFN and isinstance(value, int):
            setattr(config, key, 128)
        elif key in SMALL and isinstance(value, (int, float)) and not isinstance(SMALL[key], bool):
            setattr(config, key, SMALL[key])
    return config


# ---------------------------------------------------------------------------------- candidates


def candidates(select_all: bool, only: set[str] | None) -> list[dict]:
    """One entry per model: key, library, task, model type, class name."""
    try:
        from transformers.models.auto import modeling_auto
    except Exception:  # noqa: BLE001 - transformers is optional
        return torchvision_candidates(only, select_all)
    out, seen = [], set()
    encoders = set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)  # encoders classify; decoders generate
    for task in PREFERRED:
        for model_type, cls_name in getattr(modeling_auto, TASKS[task]).items():
            if task == "causal" and model_type in encoders:
                continue
            if model_type in seen or (not select_all and only is None and model_type not in DEFAULT):
                continue
            if only is not None and model_type not in only:
                continue
            seen.add(model_type)
            out.append({"key": model_type, "library": "transformers", "task": task, "type": model_type,
                        "class": cls_name if isinstance(cls_name, str) else cls_name[0]})
    if only is None or "t5_encoder" in only:
        out.append({"key": "t5_encoder", "library": "transformers", "task": "encoder", "type": "t5",
                    "class": "T5EncoderModel"})
    return out + torchvision_candidates(only, select_all)


def torchvision_candidates(only: set[str] | None, select_all: bool = False) -> list[dict]:
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - the CPU build of this torch has no matching torchvision
        return [{"key": "torchvision", "library": "torchvision", "skip": f"torchvision does not import: "
                 f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}]
    names = torchvision.models.list_models(module=torchvision.models)
    pick = (lambda n: True) if select_all else (lambda n: n in TV_DEFAULT)
    if only is not None:  # "tv": the default torchvision set; tv_<name>: that model
        pick = (lambda n: n in TV_DEFAULT) if "tv" in only else (lambda n: f"tv_{n}" in only)
    names = sorted(names, key=lambda n: TV_DEFAULT.index(n) if n in TV_DEFAULT else len(TV_DEFAULT))
    return [{"key": f"tv_{n}", "library": "torchvision", "task": "image", "type": n, "class": n}
            for n in names if pick(n)]


# ------------------------------------------------------------------------------ one model (child)


def build(entry: dict):
    """(model, args, kwargs) for one entry, random weights, eval mode."""
    import torch

    torch.manual_seed(0)
    if entry["library"] == "torchvision":
        import torchvision

        try:  # the ViTs fix their image size at construction; other builders refuse the argument
            model = torchvision.models.get_model(entry["type"], weights=None, num_classes=10, image_size=TV_SIZE)
        except TypeError:
            model = torchvision.models.get_model(entry["type"], weights=None, num_classes=10)
        model.eval()
        for size in (TV_SIZE, TV_FALLBACK_SIZE):  # maxvit's window partitions need 224x224
            x = torch.randn(BATCH, 3, size, size)
            try:
                with torch.no_grad():
                    model(x)
                break
            except RuntimeError:
                if size == TV_FALLBACK_SIZE:
                    raise
        return model, (x,), {}
    import transformers

    config = small_config(transformers.AutoConfig.for_model(entry["type"]))
    model = getattr(transformers, entry["class"])(config).eval()  # (the first class where a mapping lists several)
    vocab = getattr(config, "vocab_size", None) or 100
    ids = torch.randint(2, min(vocab, 100), (BATCH, SEQ))
    task = entry["task"]
    if task == "image":
        size = config.image_size if isinstance(getattr(config, "image_size", None), int) else 64
        channels = getattr(config, "num_channels", 3)
        return model, (torch.randn(BATCH, channels, size, size),), {}
    if task == "audio":
        if model.main_input_name == "input_features":
            frames = 2 * getattr(config, "max_source_positions", 32)
            return model, (torch.randn(BATCH, config.num_mel_bins, frames),), {}
        return model, (torch.randn(BATCH, 4000),), {}
    if task == "seq2seq":
        return model, (ids,), {"decoder_input_ids": torch.randint(2, min(vocab, 100), (BATCH, DEC_SEQ))}
    return model, (ids,), {"attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def leaves(out) -> list:
    import torch

    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def rel_diff(got, want) -> float:
    import numpy as np

    worst = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), w.detach().double().numpy()
        worst = max(worst, float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)))
    return worst


def dense_summary(frozen, dense_reasons: dict) -> list[str]:
    """The largest tensors the frozen model stores as they were, with why (when the plan says)."""
    from nesc.core.modules import tensor_roles

    roles = tensor_roles(frozen)
    sizes = [(t.numel(), n) for n, t in frozen.state_dict().items() if n not in roles and t.is_floating_point()]
    return [f"{n} ({k:,}: {dense_reasons.get(n, 'not a weight of a sampled op')})" for k, n in sorted(sizes)[::-1][:3]]


def run_one(entry: dict, out_path: Path) -> None:
    """Run every stage of one model, writing ``out_path`` after each."""
    import torch

    torch.set_flush_denormal(True)
    import nesc

    result = {"key": entry["key"], "library": entry["library"], "class": entry.get("class"),
              "stages": dict.fromkeys(STAGES, "skip"), "errors": {}, "seconds": {}}

    def save():
        out_path.write_text(json.dumps(result))

    def stage(name, fn):
        result["stages"][name] = "running"
        save()
        t0 = time.perf_counter()
        try:
            value = fn()
            result["stages"][name] = "pass" if value is not False else "fail"
        except Exception as e:  # noqa: BLE001 - recorded, the next model still runs
            value = None
            result["stages"][name] = "fail"
            text = str(e).strip().splitlines()
            result["errors"][name] = f"{type(e).__name__}: {text[0][:300] if text else ''}"
            if name == "transform" and reachable(str(e)) is not None:
                result["reachable"] = reachable(str(e))
        result["seconds"][name] = round(time.perf_counter() - t0, 2)
        save()
        return result["stages"][name] == "pass", value

    try:
        model, args, kwargs = build(entry)
        with torch.no_grad():
            reference = model(*args, **kwargs)
        result["dense_params"] = sum(p.numel() for p in model.parameters())
    except Exception as e:  # noqa: BLE001 - a config the generic recipe cannot build
        result["build_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        save()
        return
    del reference
    if "example_kwargs" not in inspect.signature(nesc.transform).parameters:
        kwargs = {}  # a nesc without keyword inputs: positional inputs only
    from nesc.core.inputs import in_signature_order

    kwargs = in_signature_order(model.forward, kwargs)
    flat = args + tuple(kwargs.values())  # the transformed model takes them in this order, too
    state = {}

    def transform_once():
        return nesc.transform(model, args, ratio=RATIO, **({"example_kwargs": kwargs} if kwargs else {}))

    def transform():
        state["gm"] = gm = transform_once()
        frozen = nesc.freeze(gm)
        result["ratio"] = round(result["dense_params"] / max(nesc.stored_params(frozen), 1), 3)
        result["dense"] = dense_summary(frozen, gm.meta.get("nesc_dense_reasons", {}))
        result["capture"] = gm.meta.get("nesc_capture")

    def train():
        gm = state["gm"].train()
        opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
        loss = sum(t.float().pow(2).mean() for t in leaves(gm(*args, **kwargs))[:1])
        loss.backward()
        opt.step()
        return bool(torch.isfinite(loss))

    def freeze():
        gm = state["gm"].eval()
        state["frozen"] = frozen = nesc.freeze(gm)
        with torch.no_grad():
            state["want"] = want = leaves(frozen(*args, **kwargs))
            result["freeze_diff"] = rel_diff([t.numpy() for t in leaves(gm(*args, **kwargs))], want)
        return result["freeze_diff"] <= FREEZE_TOL

    def save_load():
        with tempfile.TemporaryDirectory() as tmp:
            nesc.save(state["frozen"], Path(tmp) / "m.nesc")
            loaded = nesc.load(Path(tmp) / "m.nesc")
        with torch.no_grad():
            result["save_load_diff"] = rel_diff([t.numpy() for t in leaves(loaded(*flat))], state["want"])
        return result["save_load_diff"] <= FREEZE_TOL

    def onnx():
        from nesc.backends.onnx import ort_session

        with tempfile.TemporaryDirectory() as tmp:
            nesc.export_onnx(state["frozen"], flat, Path(tmp) / "m.onnx")
            session = ort_session(Path(tmp) / "m.onnx", threads=1)
            feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat)}
            got = [o for o in session.run(None, feeds) if o.dtype.kind == "f"]
        result["onnx_diff"] = rel_diff(got, state["want"])
        return result["onnx_diff"] <= BACKEND_TOL

    def tvm():
        compiled = nesc.compile(state["frozen"], flat)
        got = compiled(*flat)
        got = [o for o in (got if isinstance(got, (tuple, list)) else (got,)) if o.dtype.kind == "f"]
        result["tvm_diff"] = rel_diff(got, state["want"])
        return result["tvm_diff"] <= BACKEND_TOL

    for name, fn in zip(STAGES, (transform, train, freeze, save_load, onnx, tvm)):
        ok, _ = stage(name, fn)
        if not ok and name == "transform":
            reach_at_lower_ratio(model, args, kwargs, result, save)
        if not ok and name in ("transform", "freeze"):
            break  # everything after needs it
        if name == "train" and not ok:
            state["gm"] = transform_once()  # freeze an untouched transform instead


def reachable(message: str) -> float | None:
    """The ratio a PlanError says is reachable ("... so at most 3.69x is reachable"), or None."""
    import re

    found = re.search(r"at most (\d+(?:\.\d+)?)x", message, re.IGNORECASE)
    return float(found.group(1)) if found else None


def reach_at_lower_ratio(model, args, kwargs, result: dict, save) -> None:
    """After a failed transform at RATIO: the ratio reached and what stays dense at the ratio the error
    says is reachable (a little under it), else at FALLBACK_RATIO."""
    import nesc

    said = result.get("reachable")
    ratio = round(said * 0.98, 2) if said and said > 1 else FALLBACK_RATIO
    try:
        gm = nesc.transform(model, args, ratio=ratio, init="random",
                            **({"example_kwargs": kwargs} if kwargs else {}))
        frozen = nesc.freeze(gm)
    except Exception as e:  # noqa: BLE001 - recorded
        result["fallback"] = f"ratio {ratio:g} fails too: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    else:
        result["fallback"] = f"ratio {ratio:g} reaches {result['dense_params'] / max(nesc.stored_params(frozen), 1):.2f}x"
        result["dense"] = dense_summary(frozen, gm.meta.get("nesc_dense_reasons", {}))
    save()


# ------------------------------------------------------------------------------------ driver


def run_all(entries: list[dict], results: dict, timeout: float, path: Path) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("zoo", total=len(entries))
        for entry in entries:
            progress.update(task, description=f"zoo: {entry['key']}")
            results[entry["key"]] = one_subprocess(entry, timeout)
            r = results[entry["key"]]
            console.print(f"{entry['key']:<16} " + " ".join(f"{s}={r.get('stages', {}).get(s, '-')}" for s in STAGES)
                          + (f"  {r['build_error']}" if r.get("build_error") else ""))
            write(results, path)
            progress.advance(task)


def one_subprocess(entry: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--one", json.dumps(entry), "--out", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            tail = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
        except subprocess.TimeoutExpired:
            proc, tail = None, [f"timed out after {timeout:g} s"]
        result = json.loads(out.read_text()) if out.exists() else {"key": entry["key"], "stages": {}, "errors": {}}
    for name, status in result.get("stages", {}).items():
        if status == "running":
            result["stages"][name] = "timeout" if proc is None else "crash"
            result["errors"][name] = tail[0][:300] if tail else "the process died"
    if not result.get("stages") and tail and "build_error" not in result:
        result["build_error"] = tail[0][:300]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def write(results: dict, path: Path) -> None:
    meta = results.setdefault("_meta", {})
    meta.update({"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "ratio": RATIO,
                 "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "load_average": os.getloadavg(), "freeze_tol": FREEZE_TOL, "backend_tol": BACKEND_TOL})
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    path.with_suffix(".md").write_text(markdown(results))


def markdown(results: dict) -> str:
    meta = results["_meta"]
    rows = [r for k, r in sorted(results.items()) if k != "_meta"]
    passed = sum(all(r.get("stages", {}).get(s) == "pass" for s in STAGES) for r in rows if "skip" not in r)
    lines = [
        "# Zoo: public architectures through every nesc stage", "",
        f"`{meta['command']}` (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), updated "
        f"{meta['updated']}, load average {', '.join(f'{x:.1f}' for x in meta['load_average'])}.", "",
        f"Ratio asked: {meta['ratio']:g}. Parity: freeze and save/load max |diff| / max |out| <= "
        f"{meta['freeze_tol']:g}; ONNX (onnxruntime) and TVM (llvm) <= {meta['backend_tol']:g}. "
        f"{passed} of {sum('skip' not in r for r in rows)} models pass every stage.", "",
        "| model | class | " + " | ".join(STAGES) + " | ratio | first error | largest dense |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|---|",
    ]
    for r in rows:
        if "skip" in r:
            lines.append(f"| {r['key']} | - | " + " | ".join("-" for _ in STAGES) + f" | - | {r['skip']} | - |")
            continue
        stages = r.get("stages", {})
        first = next((f"{s}: {r['errors'][s]}" if s in r.get("errors", {}) else f"{s}: {parity(r, s)}"
                      for s in STAGES if s in r.get("errors", {}) or stages.get(s) == "fail"), r.get("build_error", ""))
        first = first.replace("|", "/").replace("\n", " ")[:220]
        first += (f" (says at most {r['reachable']:g}x)" if r.get("reachable") else "") + (
            f" ({r['fallback']})" if r.get("fallback") else "")
        lines.append(f"| {r['key']} | {r.get('class') or '-'} | " + " | ".join(stages.get(s, "-") for s in STAGES)
                     + f" | {r.get('ratio', '-')} | {first} | {'; '.join(r.get('dense', []))[:200]} |")
    if meta.get("not_run"):
        lines += ["", f"Not run yet (rerun the command: finished models are kept): {', '.join(meta['not_run'])}."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def parity(r: dict, stage: str) -> str:
    """Why a stage without an exception failed: its output differs beyond the tolerance."""
    diff = r.get(f"{stage}_diff")
    tol = BACKEND_TOL if stage in ("onnx", "tvm") else FREEZE_TOL
    if diff is None:
        return "failed"
    if stage == "train":
        return "the loss is not finite"
    return f"max abs diff / max abs out = {diff:.2g} > {tol:g}" if diff > tol else "failed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every model type of the task mappings")
    parser.add_argument("--models", help="comma-separated keys (model types, t5_encoder, tv_<name>; tv: the "
                        "default torchvision set)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per model")
    parser.add_argument("--force", action="store_true", help="rerun models already in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: one entry as JSON
    args = parser.parse_args(argv)
    if args.one:
        run_one(json.loads(args.one), args.out)
        return 0
    only = set(args.models.split(",")) if args.models else None
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries = candidates(args.all, only)
    for e in entries:
        if "skip" in e:
            results[e["key"]] = e
    if any(e["library"] == "torchvision" and "skip" not in e for e in entries):
        results.pop("torchvision", None)  # the "does not import" row of a run in another environment
    todo = [e for e in entries if "skip" not in e and (args.force or e["key"] not in results)]
    run_all(todo, results, args.timeout, args.out)
    write(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
