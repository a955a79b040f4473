"""One rank of the distributed tests (tests/nesc/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --nproc-per-node 2 tests/nesc/distributed_worker.py \\
        --mode fsdp --model resnet_fmnist --task train --out OUT

``train``: ``fit_distributed`` on the shared setup below; every rank writes its final state
(``rank<r>.safetensors``) and a JSON with its history and the names that differ between ranks.
``resume``: the same run uninterrupted (OUT/full) and stopped after one epoch then resumed (OUT/cut);
both states and histories are written. The test builds its single-process reference from the same
``setup``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# torchrun puts this folder first on sys.path, where tests/nesc/ would shadow the real nesc package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import nesc  # noqa: E402
from nesc.data import Dataset, DataSpec  # noqa: E402
from nesc.models import get_spec  # noqa: E402
from nesc.train import TrainConfig  # noqa: E402

MODELS = {  # name -> (factory kwargs, NESConfig): no dropout, so a reference run draws no random masks
    "mlp": ({"dropout": 0.0}, nesc.NESConfig(ratio=4, policy="per_type")),
    "resnet_fmnist": ({"width_mult": 0.5}, nesc.NESConfig(ratio=2, policy="per_type", min_params=1)),
}
CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.05, optimizer="sgd", schedule="cosine", device="cpu",
                     progress=False)
TRAIN, TEST = 24, 16  # samples: 3 global batches of 8 per epoch


def setup(model: str) -> tuple[torch.fx.GraphModule, Dataset]:
    """The transformed model and the synthetic 28x28 dataset every rank and the reference start from."""
    kwargs, config = MODELS[model]
    spec = get_spec(model)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(TRAIN + TEST, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (TRAIN + TEST,), generator=gen)
    ds = Dataset(DataSpec("synthetic", (1, 28, 28), 10, "random images, random labels"), x[:TRAIN], y[:TRAIN],
                 x[TRAIN:], y[TRAIN:])
    torch.manual_seed(0)
    gm = nesc.transform(spec.create(**kwargs), (x[:2],), config)
    return gm, ds


def _write(out: Path, tag: str, gm, result, rank: int) -> None:
    from nesc.distributed import ranks_identical

    state = {k: v.detach().contiguous() for k, v in gm.state_dict().items()}
    differ = ranks_identical(state)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"{tag}rank{rank}.safetensors"))
    (out / f"{tag}rank{rank}.json").write_text(json.dumps({"history": result.history, "differ": differ}))


def main() -> int:
    from nesc.distributed import fit_distributed, init_process_group

    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--task", choices=("train", "resume"), default="train")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rank, _ = init_process_group()
    if args.task == "train":
        gm, ds = setup(args.model)
        result = fit_distributed(gm, ds, CONFIG, mode=args.mode)
        _write(args.out, "", gm, result, rank)
    else:
        gm, ds = setup(args.model)
        result = fit_distributed(gm, ds, CONFIG, mode=args.mode, out_dir=args.out / "full-run")
        _write(args.out, "full-", gm, result, rank)
        gm, ds = setup(args.model)
        fit_distributed(gm, ds, CONFIG, mode=args.mode, out_dir=args.out / "cut-run", stop_after=1)
        gm, ds = setup(args.model)  # a fresh process's model: everything else comes from the checkpoint
        result = fit_distributed(gm, ds, CONFIG, mode=args.mode, out_dir=args.out / "cut-run")
        _write(args.out, "cut-", gm, result, rank)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
