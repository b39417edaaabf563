"""Import layering (issue 12): the core never reaches for research tooling, and training uses only public names.

    core      ops, block, hf/, generation, cache, layout, ... : the kernels, the layer, the HF patching, generation
    research  train/, tasks/, charlm (tiny-model builders), demo, integrations/, the CLI (cli, argtypes)

The core imports nothing of the research side (not even lazily, inside a function); the training side imports no
private (underscore) name of the CLI or of the core, and nothing of the CLI at all (the CLI composes training, not
the other way round). Imports are read from the source with `ast`, so nothing is executed.
"""

import ast
import pathlib
from typing import Iterator, List, Tuple

import pytest
from hf_models import MODEL_TYPES

import bridge_ops

PACKAGE = pathlib.Path(bridge_ops.__file__).parent
CORE = [
    "__init__.py",
    "_loader.py",
    "aggregation.py",
    "block.py",
    "cache.py",
    "checks.py",
    "cupy_backend.py",
    "dispatch.py",
    "files.py",
    "generation.py",
    "info.py",
    "layout.py",
    "ops.py",
    "reference.py",
    "version.py",
    "hf",
]
RESEARCH = [
    "bridge_ops.train",
    "bridge_ops.tasks",
    "bridge_ops.charlm",
    "bridge_ops.demo",
    "bridge_ops.integrations",
    "bridge_ops.cli",
    "bridge_ops.argtypes",
]
CLI = ["bridge_ops.cli"]  # (bridge_ops.argtypes, the argparse types, are shared with train/commands.py)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> Iterator[Tuple[str, str, int]]:
    """(module, imported name or "", line) for every import of a file, relative ones made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                yield base, alias.name, node.lineno


def within(module: str, prefixes: List[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def files(entries: List[str]) -> List[pathlib.Path]:
    out = []
    for entry in entries:
        path = PACKAGE / entry
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def core_violations(path: pathlib.Path) -> List[str]:
    # `from a import b` may import the module a.b
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}{'.' + name if name else ''}"
        for module, name, line in imports(path)
        if within(module, RESEARCH) or within(f"{module}.{name}", RESEARCH)
    ]


def training_violations(path: pathlib.Path) -> List[str]:
    found = []
    for module, name, line in imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line}"
        target = f"{module}.{name}" if name else module
        if within(target, CLI):
            found.append(f"{where} imports the CLI ({target})")
        elif name.startswith("_") and within(module, ["bridge_ops"]) and not within(module, ["bridge_ops.train"]):
            found.append(f"{where} imports the private name {name} of {module}")
    return found


def test_every_module_is_classified():
    """A new module must be placed on one side (CORE or RESEARCH), so the checks below see it."""
    core = {module_name(p) for p in files(CORE)}
    research = {module_name(p) for p in PACKAGE.rglob("*.py") if within(module_name(p), RESEARCH)}
    everything = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert everything - core - research == set()
    assert core & research == set()


@pytest.mark.parametrize("path", files(CORE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_does_not_import_research_tooling(path):
    assert core_violations(path) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "train").rglob("*.py")), ids=lambda p: p.name)
def test_training_imports_no_private_name_of_the_cli_or_the_core(path):
    assert training_violations(path) == []


def test_the_checks_catch_violations(tmp_path, monkeypatch):
    """The checks above are not vacuous: they flag each kind of import they exist for."""
    package = tmp_path / "bridge_ops"
    (package / "hf").mkdir(parents=True)
    (package / "train").mkdir()
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    core = package / "hf" / "patch.py"
    core.write_text(
        "from ..train import Trainer\n\ndef f():\n    from bridge_ops import charlm\n    import bridge_ops.cli\n"
    )
    assert [v.split(" imports ")[1] for v in core_violations(core)] == [
        "bridge_ops.train.Trainer",
        "bridge_ops.charlm",
        "bridge_ops.cli",
    ]
    training = package / "train" / "commands.py"
    training.write_text(
        "from ..cli import positive_int\nfrom ..hf.patch import _generic_norm, decoder_layers\n"
        "from .sft import _private_of_training\nfrom ..argtypes import positive_float\n"
    )
    assert training_violations(training) == [
        "bridge_ops/train/commands.py:1 imports the CLI (bridge_ops.cli.positive_int)",
        "bridge_ops/train/commands.py:2 imports the private name _generic_norm of bridge_ops.hf.patch",
    ]


def test_supported_model_types_are_listed_once_and_tested():
    """bridge_ops.hf.patch names the supported model types; the CLI derives its own; the tests build each one."""
    from bridge_ops.hf import SUPPORTED_MODEL_TYPES
    from bridge_ops.hf.patch import RMS_NORM_CLASSES

    assert SUPPORTED_MODEL_TYPES == tuple(RMS_NORM_CLASSES)
    assert sorted(MODEL_TYPES) == sorted(SUPPORTED_MODEL_TYPES)
    for path in PACKAGE.rglob("*.py"):
        if path.name != "patch.py":
            assert '"qwen3"' not in path.read_text(), f"{path} lists model types; use SUPPORTED_MODEL_TYPES"
