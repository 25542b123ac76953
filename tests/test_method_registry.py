"""The method registry: every method is reached through it, and the core never names one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftkit
from peftkit import registry
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.prefix import PrefixConfig

SRC = Path(peftkit.__file__).parent
# The core and the users of the registry: none of them may import a method's folder or name a method.
CORE = ["registry.py", "record.py", "files.py", "inject.py", "adapters.py", "merge.py", "checkpoint.py",
        "targeting.py", "train/loop.py", "train/recipe.py", "train/run.py", "train/method.py", "train/loss.py",
        "plan/memory.py"]
def _method_words() -> set[str]:
    """Every name that identifies a registered method: its peft_type, train names, config class, and the classes
    its own folder defines (layers, holders): derived from the registry, so a new method is covered unlisted."""
    import inspect

    words = set(registry.peft_types()) | set(registry.train_names())
    for method in registry.methods():
        words.add(method.config_class.__name__)
        folder = method.config_class.__module__.rsplit(".", 1)[0]
        for module in [m for name, m in list(__import__("sys").modules.items()) if name.startswith(folder + ".")]:
            words |= {n for n, obj in vars(module).items()
                      if inspect.isclass(obj) and obj.__module__ == module.__name__ and n.endswith(("Layer", "Adapters"))}
    return words - {"prefix"}  # also a plain identifier (a name prefix); PREFIX_TUNING and PrefixConfig stay


METHOD_WORDS = _method_words()
assert {"LoraLayer", "BottleneckLayer", "PrefixAdapters", "PromptEncoderConfig", "ptuning-lstm"} <= METHOD_WORDS
# Defaults, not dispatch: PEFT reads a config without peft_type as LORA, and the planner's default --method.
ALLOWED = {"registry.py": {"LORA"}, "plan/memory.py": {"lora"}}


def test_the_builtin_methods_are_registered_under_peft_types():
    assert registry.peft_types() == ["LORA", "BOTTLENECK", "PREFIX_TUNING", "IA3", "LOHA", "LOKR", "VERA", "ADALORA",
                                     "PROMPT_TUNING", "P_TUNING", "OFT"]
    assert registry.train_names() == ["lora", "qlora", "dora", "bottleneck", "prefix", "ia3", "loha", "lokr", "vera",
                                      "adalora", "prompt", "ptuning", "ptuning-lstm", "oft"]
    assert registry.by_train_name("dora") is registry.by_peft_type("LORA")
    assert registry.nf4_train_names() == ["qlora"]
    for config in (LoraConfig(target_modules=["q"]), BottleneckConfig(), PrefixConfig(), IA3Config()):
        method = registry.for_config(config)
        assert method.config_class is type(config)
        assert type(registry.config_from_peft_dict(config.to_peft_dict())) is type(config)


def test_unknown_types_and_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="'BOFT'.*LORA, BOTTLENECK, PREFIX_TUNING, IA3, LOHA"):
        registry.config_from_peft_dict({"peft_type": "BOFT"})
    with pytest.raises(ValueError, match="'boft'.*lora, qlora, dora, bottleneck, prefix, ia3, loha"):
        registry.by_train_name("boft")
    with pytest.raises(TypeError, match="inject expects an adapter config .*got dict"):
        registry.for_config({"peft_type": "LORA"})


def test_a_method_cannot_be_registered_twice_under_one_type_or_name():
    lora = registry.by_peft_type("LORA")

    class Impostor:
        peft_type, train_names, config_class = "LORA", ("other",), LoraConfig

    with pytest.raises(ValueError, match="peft_type 'LORA' is registered twice"):
        registry.register(Impostor())
    Impostor.peft_type, Impostor.train_names = "NEW_TYPE", ("lora",)
    with pytest.raises(ValueError, match="train method name 'lora' is registered twice"):
        registry.register(Impostor())
    assert registry.register(lora) is lora  # the same object again is no conflict
    assert "NEW_TYPE" not in registry.peft_types()


def _names_in(path: Path) -> tuple[list[str], set[str]]:
    tree = ast.parse(path.read_text())
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imports.append(node.module)
        elif isinstance(node, ast.Import):
            imports.extend(a.name for a in node.names)
    code = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    code |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    code |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return imports, code


@pytest.mark.parametrize("module", CORE)
def test_the_core_never_names_a_method(module):
    imports, names = _names_in(SRC / module)
    assert not [m for m in imports if "methods" in m], f"{module} imports a method's folder: {imports}"
    named = names & METHOD_WORDS - ALLOWED.get(module, set())
    assert not named, f"{module} names a method: {sorted(named)}"
