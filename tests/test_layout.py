"""The house: every import inside tunesmith resolves (also the ones inside functions that only run on a GPU),
and imports flow one way, from the commands down to the core."""

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tunesmith"

# Floors, top to bottom: a module may import from its own floor or below, never from above.
FLOORS = {
    "cli": 6, "__main__": 6,
    "webui.app": 6,  # builds and checks `tunesmith sft` command lines with cli's parser
    "inference.infer": 4, "inference.deploy": 4, "inference.evaluate": 4, "export.merge": 4, "export.gguf": 4,
    "export.modelfile": 4,
    "data.inspect": 4,  # commands
    "train.recipe": 3, "train.loop": 3, "train.batches": 3, "train.run_log": 3, "train.distributed": 3,
    "train.planner": 3, "train.checkpoint": 3, "train.resume": 3, "train.stopping": 3, "train.prebuild": 3, "train.status": 3,
    "train.rlhf": 3, "train.preference": 3, "train.keep": 3,  # train
    "engine.attention": 2, "engine.fused_loss": 2, "engine.patches": 2, "engine.checkpointing": 2,
    "engine.activation_memory": 2, "engine.decoder_layer": 2, "engine.lora_linear": 2, "engine.kernels": 2,
    "engine.triton_lora": 2, "engine.cuda_graphs": 2, "engine.kernel_cache": 2, "engine.moe_lora": 2,  # engine
    "model.resolve": 2, "model.load": 2, "model.preload": 2, "model.families": 2,  # model
    "data.sources": 2, "data.template": 2, "data.cache": 2, "data.preference": 2, "data.replay": 2,  # data
    "args": 1, "errors": 1, "quiet": 1, "console": 1, "settings": 1, "files": 1,  # core
}
# Upward imports that remain, each inside a function: none now. A new one fails.
KNOWN_UPWARD: set = set()


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path, rel.name == "__init__"


def imports(name: str, path: Path, is_package: bool):
    """(module imported, names, line, at module level) for every tunesmith import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("tunesmith"):
                target = node.module[len("tunesmith."):] if node.module != "tunesmith" else ""
            else:
                continue
            yield target, [a.name for a in node.names], node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tunesmith."):
                    yield a.name[len("tunesmith."):], [], node.lineno, id(node) in top


def edges():
    """(importer, imported module, line): a name imported from a package that is a module counts as that module."""
    for name, path, is_package in modules():
        for target, names, line, _ in imports(name, path, is_package):
            for n in names or [None]:
                sub = f"{target}.{n}".strip(".") if n else target
                yield name, (sub if sub in FLOORS else target), line


def test_every_import_resolves():
    for name, path, is_package in modules():
        for target, names, line, _ in imports(name, path, is_package):
            module = importlib.import_module("tunesmith" + (f".{target}" if target else ""))
            for n in names:
                assert hasattr(module, n) or importlib.util.find_spec(f"{module.__name__}.{n}"), \
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {n} is not in {module.__name__}"


def test_every_module_has_a_floor():
    named = {name for name, _, is_package in modules() if not is_package and name}
    assert named - set(FLOORS) == set(), "give each new module a floor in FLOORS"


def test_imports_flow_down():
    upward = set()
    for importer, imported, line in edges():
        if importer in FLOORS and imported in FLOORS and FLOORS[imported] > FLOORS[importer]:
            upward.add((importer, imported))
            assert (importer, imported) in KNOWN_UPWARD, f"tunesmith/{importer}: line {line} imports {imported} from a floor above"
    assert upward == KNOWN_UPWARD, f"gone, drop from KNOWN_UPWARD: {KNOWN_UPWARD - upward}"


def test_no_import_cycle_at_module_level():
    graph: dict[str, set] = {}
    for name, path, is_package in modules():
        for target, names, _, at_top in imports(name, path, is_package):
            if at_top:
                for n in names or [None]:
                    sub = f"{target}.{n}".strip(".") if n else target
                    graph.setdefault(name, set()).add(sub if sub in FLOORS else target)

    def visit(node, trail):
        assert node not in trail, "import cycle: " + " -> ".join(trail[trail.index(node):] + [node])
        for nxt in graph.get(node, ()):
            visit(nxt, trail + [node])

    for start in graph:
        visit(start, [])
