"""Imports run one way: models <- data <- train <- launch, with conf (the configuration) readable by all. A module
importing a package above its own (even inside a function) fails here, naming the module and the import."""
import ast

from tests.conftest import REPO

LAYERS = ["models", "data", "train", "launch"]


def imported_packages(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]


def upward_imports():
    found = []
    for level, package in enumerate(LAYERS):
        above = set(LAYERS[level + 1:])
        for path in sorted((REPO / package).rglob("*.py")):
            found += [f"{path.relative_to(REPO)}:{line} imports {name}" for line, name in imported_packages(path)
                      if name in above]
    return found


def test_no_module_imports_a_package_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    import tests.unit.test_layering as layering

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text("def f():\n    from train.config import TrainConfig\n")
    monkeypatch.setattr(layering, "REPO", tmp_path)
    monkeypatch.setattr(layering, "LAYERS", ["models", "train"])
    assert upward_imports() == ["models/bad.py:2 imports train"]


def test_models_know_nothing_about_distribution():
    """DESIGN: parallelism is applied to a built model from train/, so no model module uses torch.distributed."""
    found = []
    for path in sorted((REPO / "models").rglob("*.py")):
        text = path.read_text()
        found += [str(path.relative_to(REPO))] if "torch.distributed" in text or "deepspeed" in text else []
    assert found == []
