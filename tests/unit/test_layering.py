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


PACKAGES = ("conf", "models", "data", "train", "launch")
CONFIG_SECTIONS = {"models.config", "data.config", "train.config", "launch.config"}


def module_imports(repo):
    """Every Kino module -> the Kino modules it imports anywhere in its file (function bodies too)."""
    modules = {".".join(p.relative_to(repo).with_suffix("").parts): p for package in PACKAGES
               for p in (repo / package).rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in modules:
                    found.add(target)
                    break
        graph[name] = found - {name}
    return graph


def import_cycle_through(graph, start):
    """A path start -> ... -> start in the import graph, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_conf_reads_only_the_config_sections_and_no_import_leads_back_to_it():
    """conf/ is the configuration: it imports conf modules and the four typed sections, nothing that reads data or
    builds models (those checks run where the run starts: train/preflight.py), and no chain of imports, function
    bodies included, leads from it back to it (it once went conf.schema -> data.latent_cache -> conf.schema)."""
    graph = module_imports(REPO)
    for name in (n for n in graph if n.startswith("conf")):
        assert graph[name] <= CONFIG_SECTIONS | {n for n in graph if n.startswith("conf")}, (name, graph[name])
    assert import_cycle_through(graph, "conf.schema") is None, import_cycle_through(graph, "conf.schema")


def test_the_cycle_check_sees_a_cycle():
    graph = {"conf.schema": {"data.config"}, "data.config": {"data.latent_cache"}, "data.latent_cache": {"conf.schema"}}
    assert import_cycle_through(graph, "conf.schema") == ["conf.schema", "data.config", "data.latent_cache",
                                                          "conf.schema"]


def test_the_trainer_reaches_the_data_only_through_the_data_plane():
    """train/trainer.py is the loop: the coordinator, loaders, licenses, caches and provenance are the data plane's
    (train/data_plane.py). The trainer may name the batch's types and nothing else of data/."""
    graph = module_imports(REPO)
    data_side = {name for name in graph["train.trainer"]
                 if name.startswith("data.") or name in ("train.provenance", "train.collectives.gather_objects")}
    assert data_side <= {"data.batch"}, data_side
    assert "train.data_plane" in graph["train.trainer"]
