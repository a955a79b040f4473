"""``nesc models``: the registry's reference models, their parameter counts and input shapes.

    nesc models
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nesc.cli.common import format_shape
from nesc.models import dense_params, get_spec, list_models


def add_parser(commands) -> None:
    models = commands.add_parser("models", help="list the registry's reference models")
    models.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    table = Table(title=f"nesc models ({len(list_models())} registered)")
    for col, justify in [("name", "left"), ("family", "left"), ("params", "right"), ("input", "left"),
                         ("test input", "left"), ("classes", "right")]:
        table.add_column(col, justify=justify)
    with err.status(Text("building models to count their parameters")):
        for name in list_models():
            spec = get_spec(name)
            params = dense_params(name)
            table.add_row(name, spec.family, f"{params:,}", format_shape(spec.input_shape),
                          format_shape(spec.test_input_shape), str(spec.num_classes))
    out.print(table)
    return 0
