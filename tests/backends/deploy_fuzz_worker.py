"""Load deploy files in a process of their own and report one JSON line each: a crash inside a
compiled kernel ends this process, never the test run that drives it.

    python deploy_fuzz_worker.py RUNTIME_FILE --stdin [--warmup LIB]   # a .so path per input line
    python deploy_fuzz_worker.py RUNTIME_FILE FOLDER [--warmup LIB]    # every *.so under FOLDER, sorted

``RUNTIME_FILE`` is ``nesc/backends/tvm/runtime.py``, loaded by its path with torch kept out, as on a
device. Each answer: ``{"file", "outcome", "type", "message", "events", "output"}`` where outcome is
``deploy_error`` (a DeployError: the file was refused), ``ok`` (loaded and ran on its example inputs)
or ``error`` (any other exception: a bug). ``events``: what ``fuzz_helpers.audit`` recorded during
load and run (only the model's folder may be opened). ``--warmup`` loads and runs a good model first,
so that the imports TVM makes on first use are not counted as side effects of the files under test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fuzz_helpers


def _runtime(path: str):
    spec = importlib.util.spec_from_file_location("deploy_runtime", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(rt, library: str) -> dict:
    from fuzz_helpers import audit

    report = {"file": library, "outcome": "ok", "type": None, "message": None, "output": None}
    with audit([Path(library).parent]) as events:
        try:
            model = rt.load(library)
            out = model(*[spec.example() for spec in model.input_specs])
            first = out[0] if isinstance(out, tuple) else out
            report["output"] = [list(first.shape), str(first.dtype)]
        except rt.DeployError as e:
            report |= {"outcome": "deploy_error", "type": type(e).__name__, "message": str(e)[:500]}
        except BaseException as e:  # noqa: BLE001 - any other exception is what the fuzzing looks for
            report |= {"outcome": "error", "type": type(e).__name__, "message": str(e)[:500]}
    return report | {"events": list(events)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime")
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--stdin", action="store_true")
    parser.add_argument("--warmup")
    args = parser.parse_args()

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("no torch on this device", name=name)

    sys.meta_path.insert(0, NoTorch())
    rt = _runtime(args.runtime)
    if args.warmup:
        warm = _run(rt, args.warmup)
        if warm["outcome"] != "ok":
            print(json.dumps(warm | {"warmup": True}), flush=True)
            return 1
    paths = (line.strip() for line in sys.stdin) if args.stdin else map(str, sorted(Path(args.folder).rglob("*.so")))
    for path in paths:
        if path:
            print(json.dumps(_run(rt, path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
