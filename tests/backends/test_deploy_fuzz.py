"""A deploy parameters file is untrusted input: whatever its bytes, ``runtime.load`` either raises
``DeployError`` or loads a model that runs on its example input. Nothing else: no other exception,
no crash inside a compiled kernel, no side effect (a file opened outside the model's folder, a
process started, a module imported).

Loads run in a worker process (``deploy_fuzz_worker.py``, torch-free like a device) so that a
segfault fails the test instead of killing pytest. Mutations that keep the file readable recompute
its content hash (``reseal``), so that what is tested is the check behind the hash, not the hash.
``DEPLOY_FUZZ_EXAMPLES`` raises the number of examples (default 120); ``DEPLOY_FUZZ_LOG`` names a
JSON file that receives the count of outcomes per mutation.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")
hypothesis = pytest.importorskip("hypothesis")

import fuzz_helpers as fz  # noqa: E402
from helpers import COMPRESS_ALL  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from safetensors.numpy import load as load_safetensors  # noqa: E402

import nesc  # noqa: E402
from nesc.backends.tvm import runtime  # noqa: E402
from nesc.core.config import NESConfig  # noqa: E402
from product_cases import with_fractions  # noqa: E402

WORKER = Path(__file__).with_name("deploy_fuzz_worker.py")
RUNTIME_FILE = Path(runtime.__file__)
EXAMPLES = int(os.environ.get("DEPLOY_FUZZ_EXAMPLES", "120"))
ANSWER_SECONDS = 120  # one load and run of a two-layer MLP takes milliseconds; the first includes warm-up
OUTCOMES: Counter = Counter()


@dataclass(frozen=True)
class Deployment:
    """A pristine export of the smallest model with a pool, a routing map and a dense weight."""

    library: Path
    data: bytes  # the parameters file
    header: dict[str, str]
    tensors: dict[str, np.ndarray]

    def json(self, key: str):
        return json.loads(self.header[key])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = (torch.randn(2, 16),)
    frozen = nesc.freeze(nesc.transform(model, x, ratio=2, init="random", **COMPRESS_ALL))
    library = tmp_path_factory.mktemp("pristine") / "model.so"
    nesc.compile(frozen, x).export_library(library)
    data = runtime.params_path(library).read_bytes()
    deployment = Deployment(library, data, fz.metadata(data), dict(load_safetensors(data)))
    kinds = set(deployment.json("kinds").values())
    assert kinds == {"pool", "route", "dense"}, kinds
    return deployment


class Worker:
    """The worker process: ``check(params bytes)`` writes them next to a copy of the library and
    returns the worker's answer, or ``{"outcome": "crash"}`` (then starts a new worker)."""

    def __init__(self, deployment: Deployment, folder: Path) -> None:
        self.deployment, self.case = deployment, folder / "case" / "model.so"
        self.case.parent.mkdir(parents=True)
        shutil.copy(deployment.library, self.case)
        self.stderr = folder / "worker.stderr"
        self._start()

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(RUNTIME_FILE), "--stdin", "--warmup", str(self.deployment.library)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr.open("ab"), text=True)

    def check(self, data: bytes, library: Path | None = None) -> dict:
        library = library or self.case
        runtime.params_path(library).write_bytes(data)
        return self.load(library)

    def load(self, library: Path) -> dict:
        self.process.stdin.write(f"{library}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], ANSWER_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        self.process.kill()
        code = self.process.wait()
        self._start()
        return {"outcome": "crash" if ready else "hang", "returncode": code, "events": [],
                "stderr": self.stderr.read_text(errors="replace")[-2000:]}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def worker(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory):
    w = Worker(deployment, tmp_path_factory.mktemp("fuzz"))
    yield w
    w.close()
    if os.environ.get("DEPLOY_FUZZ_LOG"):
        Path(os.environ["DEPLOY_FUZZ_LOG"]).write_text(json.dumps({f"{k[0]} {k[1]}": n for k, n in
                                                                  sorted(OUTCOMES.items())}, indent=1))


def reseal(data: bytes) -> bytes:
    """``data`` with its ``content_sha256`` recomputed, as an attacker who knows the format would do;
    unchanged when the file has no usable parameter list (the reader refuses it before the hash)."""
    try:
        header, tensors = fz.metadata(data), load_safetensors(data)
        ordered = {name: tensors[name] for name in json.loads(header["params"])}
    except (KeyError, TypeError, ValueError):
        return data
    return fz.replace_tensors(data, {}, header | {"content_sha256": runtime.content_sha256(header, ordered)})


# ------------------------------------------------------------------------------------- mutations


@st.composite
def byte_edits(draw, d: Deployment) -> bytes:
    """Raw damage: flipped, truncated, inserted or deleted bytes (no reseal: the hash must catch it)."""
    return draw(fz.byte_mutations(d.data))


@st.composite
def header_entries(draw, d: Deployment) -> bytes:
    """A header entry replaced by any text or JSON value, removed, or a new one added."""
    key = draw(st.sampled_from(sorted(d.header)) | st.text(max_size=8))
    value = draw(st.none() | st.text(max_size=40) | fz.json_values().map(json.dumps))
    data = fz.set_metadata(d.data, key, value)
    return reseal(data) if draw(st.booleans()) else data


@st.composite
def json_nodes(draw, d: Deployment) -> bytes:
    """One node deep inside a JSON entry (a route's max, an input's dtype, a shape) changed or removed."""
    key = draw(st.sampled_from(sorted(runtime.SCHEMA)))
    return reseal(fz.set_metadata(d.data, key, json.dumps(draw(fz.json_edit(d.json(key))))))


def _values(a: np.ndarray):
    if a.dtype == np.int32:
        return hnp.arrays(np.int32, a.shape, elements=st.integers(-3, 25) | st.sampled_from([2**31 - 1, -(2**31)]))
    return hnp.arrays(np.float32, a.shape, elements=st.floats(width=32, allow_nan=True) | st.sampled_from(
        [-0.0, 1.0, 1.0000001, -1e-7, 3.0e38]))


@st.composite
def tensors(draw, d: Deployment) -> bytes:
    """A tensor with other values, another dtype or another shape; the header's record of it updated
    to match or not; hash recomputed."""
    name = draw(st.sampled_from(sorted(d.tensors)))
    a = d.tensors[name]
    how = draw(st.sampled_from(["values", "dtype", "shape"]))
    if how == "values":
        new = draw(_values(a))
    elif how == "dtype":
        new = a.astype(draw(st.sampled_from(["int64", "int8", "uint8", "float16", "float32", "float64", "int32"])))
    else:
        new = np.zeros(draw(st.lists(st.integers(0, 6), max_size=4)), a.dtype)
    header = dict(d.header)
    if draw(st.booleans()):
        records = d.json("tensors") | {name: {"dtype": str(new.dtype), "shape": list(new.shape)}}
        header["tensors"] = json.dumps(records)
    return reseal(fz.replace_tensors(d.data, {name: new}, header))


@st.composite
def widened_routes(draw, d: Deployment) -> bytes:
    """The attack the library's facts stop: a route's recorded range widened (its pool unnamed, so that
    the header is consistent), a start moved into the wider range, hash recomputed."""
    routes = d.json("routes")
    name = draw(st.sampled_from(sorted(n for n, r in routes.items() if r["role"] == "starts")))
    route = routes[name]
    route["max"] = [m + draw(st.integers(0, 1000)) for m in route["max"]]
    route |= {"pool": None, "pool_shape": [max(p, m + 1) for p, m in zip(route["pool_shape"], route["max"])]}
    starts = d.tensors[name].copy()
    j, k, c = (draw(st.integers(0, n - 1)) for n in starts.shape)
    starts[j, k, c] = route["max"][c]
    return reseal(fz.replace_tensors(d.data, {name: starts}, d.header | {"routes": json.dumps(routes)}))


MUTATIONS = {"bytes": byte_edits, "header": header_entries, "json": json_nodes, "tensor": tensors,
             "widened": widened_routes}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
@given(data=st.data())
def test_any_parameters_file_is_refused_or_runs(deployment: Deployment, worker: Worker, data) -> None:
    label = data.draw(st.sampled_from(sorted(MUTATIONS)), label="mutation")
    report = worker.check(data.draw(MUTATIONS[label](deployment), label="file"))
    OUTCOMES[(label, report["outcome"])] += 1
    assert report["outcome"] in ("deploy_error", "ok"), report
    assert report["events"] == [], report


# ------------------------------------------------------------------------------ chosen cases


def test_the_pristine_export_loads_runs_and_touches_nothing_else(deployment: Deployment, worker: Worker) -> None:
    report = worker.check(deployment.data)
    assert report["outcome"] == "ok" and report["output"] == [[2, 8], "float32"], report
    assert report["events"] == []


def _starts_cases(d: Deployment):
    for name, route in d.json("routes").items():
        if route["role"] == "starts":
            for c, top in enumerate(route["max"]):
                for value in (top + 1, -1, 2**31 - 1, -(2**31)):
                    yield name, c, value


def test_an_out_of_range_start_is_a_deploy_error_not_a_segfault(deployment: Deployment, worker: Worker) -> None:
    """Measured before the check: a start past the pool segfaulted inside the regeneration kernel."""
    cases = list(_starts_cases(deployment))
    assert len(cases) == 2 * 4 * 4
    for name, c, value in cases:
        starts = deployment.tensors[name].copy()
        starts[1, 0, c] = value
        report = worker.check(reseal(fz.replace_tensors(deployment.data, {name: starts})))
        assert report["outcome"] == "deploy_error", (name, c, value, report)
        assert f"routing map {name!r}" in report["message"] and "outside the pool" in report["message"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -0.5, 1.5])
def test_fractions_outside_0_1_are_refused(deployment: Deployment, worker: Worker, value: float) -> None:
    name = next(n for n, r in deployment.json("routes").items() if r["role"] == "fracs")
    fracs = deployment.tensors[name].copy()
    fracs[0, 1, 0] = value
    report = worker.check(reseal(fz.replace_tensors(deployment.data, {name: fracs})))
    assert report["outcome"] == "deploy_error" and "finite and in [0, 1]" in report["message"], report


def test_a_consistently_widened_route_is_refused_by_the_library_facts(deployment: Deployment,
                                                                      worker: Worker, tmp_path: Path) -> None:
    routes = deployment.json("routes")
    name = next(n for n, r in routes.items() if r["role"] == "starts")
    routes[name] |= {"pool": None, "pool_shape": [64, 64, 1, 1], "max": [60, 60, 0, 0]}
    starts = deployment.tensors[name].copy()
    starts[0, 0, 0] = 60
    _assert_widened_header_refused(deployment, worker, tmp_path, name, starts, routes)


def _assert_widened_header_refused(deployment: Deployment, worker: Worker, tmp_path, name: str, starts,
                                   routes: dict) -> None:
    """Deploy ``starts`` under a header whose ``routes`` were widened consistently to allow them: the
    header alone checks out, but the library refuses it (its compiled facts differ)."""
    data = reseal(fz.replace_tensors(deployment.data, {name: starts}, deployment.header | {"routes": json.dumps(
        routes)}))
    library = tmp_path / "model.so"
    shutil.copy(deployment.library, library)
    runtime.params_path(library).write_bytes(data)
    runtime.read_params(library)  # the header alone is consistent...
    report = worker.load(library)  # ...but not what the library was built with
    assert report["outcome"] == "deploy_error" and "routes differ from what model.so was built with" in report[
        "message"], report


def test_a_damaged_or_foreign_library_is_refused_before_it_is_loaded(deployment: Deployment, worker: Worker,
                                                                     tmp_path: Path) -> None:
    library = tmp_path / "model.so"
    library.write_bytes(deployment.library.read_bytes()[:4096])  # truncated: its hash differs
    report = worker.check(deployment.data, library)
    assert report["outcome"] == "deploy_error" and "written for another build" in report["message"], report
    garbage = tmp_path / "garbage.so"  # not a library at all, with a header that names its hash
    garbage.write_bytes(b"\x7fELF not really" * 64)
    data = reseal(fz.set_metadata(deployment.data, "library_sha256", runtime.sha256(garbage)))
    report = worker.check(data, garbage)
    assert report["outcome"] == "deploy_error" and "TVM cannot load" in report["message"], report


def test_an_old_format_is_refused_with_a_re_export_message(deployment: Deployment, tmp_path: Path) -> None:
    library = tmp_path / "model.so"
    shutil.copy(deployment.library, library)
    runtime.params_path(library).write_bytes(fz.set_metadata(deployment.data, "format_version", "1"))
    with pytest.raises(runtime.DeployError, match="v1 file, written by an older nesc.*re-export it with this nesc"):
        runtime.load(library)


@pytest.mark.parametrize("what", ["fifo", "folder"])
def test_a_parameters_path_that_is_no_regular_file_is_never_opened(deployment: Deployment, tmp_path: Path,
                                                                   what: str) -> None:
    library = tmp_path / "model.so"
    shutil.copy(deployment.library, library)
    params = runtime.params_path(library)
    os.mkfifo(params) if what == "fifo" else params.mkdir()  # a FIFO opened for reading would block
    with pytest.raises(runtime.DeployError, match="is not a regular file"):
        runtime.load(library)


# ------------------------------------------------------------------------------ product maps


@pytest.fixture(scope="module")
def products_deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """A two-layer MLP whose outputs are product maps (reuse="outputs"): each layer runs once with its
    pool's rows and gathers its outputs from those products, indexed by the map's starts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = (torch.randn(2, 16),)
    config = NESConfig(ratio=4, init="random", reuse="outputs", **COMPRESS_ALL)
    frozen = with_fractions(nesc.freeze(nesc.transform(model, x, config)))
    library = tmp_path_factory.mktemp("products") / "model.so"
    nesc.compile(frozen, x).export_library(library)
    data = runtime.params_path(library).read_bytes()
    deployment = Deployment(library, data, fz.metadata(data), dict(load_safetensors(data)))
    roles = {r["role"] for r in deployment.json("routes").values()}
    assert {"product_starts", "product_fracs"} <= roles, roles
    return deployment


@pytest.fixture(scope="module")
def products_worker(products_deployment: Deployment, tmp_path_factory: pytest.TempPathFactory):
    w = Worker(products_deployment, tmp_path_factory.mktemp("products_fuzz"))
    yield w
    w.close()


def _product_routes(d: Deployment, role: str) -> dict[str, dict]:
    return {n: r for n, r in d.json("routes").items() if r["role"] == role}


def test_the_pristine_product_map_export_loads_and_runs(products_deployment: Deployment,
                                                          products_worker: Worker) -> None:
    report = products_worker.check(products_deployment.data)
    assert report["outcome"] == "ok" and report["output"] == [[2, 8], "float32"], report
    for name, route in _product_routes(products_deployment, "product_starts").items():
        groups, rows = route["products"]
        assert route["max"] == [groups - 1, rows - 1] and route["grid"] == [len(products_deployment.tensors[name])]


def test_an_out_of_range_product_start_is_a_deploy_error_not_a_segfault(products_deployment: Deployment,
                                                                          products_worker: Worker) -> None:
    """A group past the products makes the gather read past the conv's output: refused at load."""
    routes = _product_routes(products_deployment, "product_starts")
    assert len(routes) == 2
    for name, route in routes.items():
        for c, top in enumerate(route["max"]):
            for value in (top + 1, -1, 2**31 - 1, -(2**31)):
                starts = products_deployment.tensors[name].copy()
                starts[-1, c] = value
                report = products_worker.check(reseal(fz.replace_tensors(products_deployment.data, {name: starts})))
                assert report["outcome"] == "deploy_error", (name, c, value, report)
                assert f"product map {name!r}" in report["message"] and "outside the pool" in report["message"]
                assert f"row {len(starts) - 1}, coordinate {c}" in report["message"], report


@pytest.mark.parametrize("value", [np.nan, np.inf, -0.5, 1.5])
def test_product_fractions_outside_0_1_are_refused(products_deployment: Deployment, products_worker: Worker,
                                                   value: float) -> None:
    name = next(iter(_product_routes(products_deployment, "product_fracs")))
    fracs = products_deployment.tensors[name].copy()
    fracs[0] = value
    report = products_worker.check(reseal(fz.replace_tensors(products_deployment.data, {name: fracs})))
    assert report["outcome"] == "deploy_error" and "finite and in [0, 1]" in report["message"], report


def test_a_consistently_widened_product_map_is_refused_by_the_library_facts(
        products_deployment: Deployment, products_worker: Worker, tmp_path: Path) -> None:
    routes = products_deployment.json("routes")
    name = next(iter(_product_routes(products_deployment, "product_starts")))
    routes[name] |= {"pool": None, "products": [64, 64], "max": [63, 63]}
    starts = products_deployment.tensors[name].copy()
    starts[0] = 63
    _assert_widened_header_refused(products_deployment, products_worker, tmp_path, name, starts, routes)


@pytest.mark.parametrize("edit, match", [
    (lambda r: r | {"grid": r["grid"] * 2}, "header entry routes must be"),  # a 2-D grid: not a product map
    (lambda r: r | {"pool_shape": [1, 1, 1, 1]}, "header entry routes must be"),  # a key of the other schema
    (lambda r: {k: v for k, v in r.items() if k != "max"}, "header entry routes must be"),  # starts need a max
    (lambda r: r | {"max": [r["products"][0], 0]}, r"routes\[.*\]\['max'\] must be below its products"),
    (lambda r: r | {"products": [r["products"][0], r["products"][1] + 1], "max": [0, 0]},
     r"routes\[.*\]\['pool'\] must be null or a pool of"),  # rows that are not its pool's
])
def test_a_product_route_that_breaks_its_schema_is_refused(products_deployment: Deployment, tmp_path: Path,
                                                           edit, match: str) -> None:
    routes = products_deployment.json("routes")
    name = next(iter(_product_routes(products_deployment, "product_starts")))
    routes[name] = edit(routes[name])
    library = tmp_path / "model.so"
    shutil.copy(products_deployment.library, library)
    runtime.params_path(library).write_bytes(reseal(fz.set_metadata(products_deployment.data, "routes",
                                                                    json.dumps(routes))))
    with pytest.raises(runtime.DeployError, match=match):
        runtime.read_params(library)
