"""An artifact is about as small as the ratio says (issue 14): at ratio 4, the file ratio (the dense model
saved the same way, over the artifact) is within 10% of the stored-parameter ratio of ``nesc.report``
for registry models of 50K parameters and up, and the encoding (documents, container) costs under 10%
of the ratio of the tensors the two files hold. mobilenetv2_fmnist misses the first by what no encoding
can remove (its batch-norm statistics: an expected failure, strict, so that a fix shows); with its batch
norms folded (``nesc.freeze(gm, fold_batchnorm=True)``, the dense model folded the same way) it meets it.
``benchmarks/bench_artifact.py`` reports the same sizes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import nesc
from helpers import registry_inputs, registry_model
from nesc.passes.find_weights import find_weights
from nesc.passes.fold_batchnorm import fold_batchnorm
from nesc.report import build_report
from serialize_cases import read_artifact

TOLERANCE = 0.10


@dataclass(frozen=True)
class Sizes:
    stored_ratio: float  # nesc.report: dense parameters / stored parameters (pools, routing maps, dense layers)
    file: int
    dense_file: int
    tensors: int  # bytes of the tensors in the file: the stored ones and buffers (batch-norm statistics)
    dense_tensors: int

    @property
    def file_ratio(self) -> float:
        return self.dense_file / self.file

    @property
    def tensor_ratio(self) -> float:
        return self.dense_tensors / self.tensors


def _tensor_bytes(path) -> int:
    return sum(t.numel() * t.element_size() for t in read_artifact(path)[1].values())


@pytest.fixture(scope="module", params=["resnet_fmnist", "mobilenetv2_fmnist", "mobilenetv2_fmnist-folded"])
def sizes(request, tmp_path_factory) -> Sizes:
    name, _, folded = request.param.partition("-")
    model, inputs = registry_model(name), registry_inputs(name)
    frozen = nesc.freeze(nesc.transform(model, inputs, nesc.NESConfig(ratio=4)), fold_batchnorm=bool(folded))
    dense = nesc.capture(model, inputs)  # the dense model, saved the same way
    if folded:
        dense = fold_batchnorm(find_weights(dense).graph_module.eval()).graph_module
    folder = tmp_path_factory.mktemp(name)
    nesc.save(frozen, folder / "model.nesc")
    nesc.save(dense, folder / "dense.nesc")
    files = [folder / "model.nesc", folder / "dense.nesc"]
    return Sizes(build_report(frozen).ratio, *(p.stat().st_size for p in files), *map(_tensor_bytes, files))


def test_the_encoding_costs_under_10_percent_of_the_tensor_ratio(sizes) -> None:
    assert sizes.file_ratio >= (1 - TOLERANCE) * sizes.tensor_ratio, sizes


def test_the_file_ratio_is_within_10_percent_of_the_stored_ratio(sizes, request) -> None:
    if request.node.callspec.id == "mobilenetv2_fmnist":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "its batch-norm statistics (10,432 bytes, buffers, ~19% of its 54,276 stored bytes) are in both "
            "files but not in the parameter ratio: the tensors alone give 3.51x against 4.00x stored")))
    assert abs(sizes.file_ratio / sizes.stored_ratio - 1) <= TOLERANCE, sizes
