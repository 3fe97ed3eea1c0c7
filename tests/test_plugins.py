"""Plugin discovery through real entry points: ``*.dist-info`` directories on ``sys.path``, no mocks.

``importlib.metadata`` finds a distribution from its ``dist-info`` folder exactly as it finds an installed
wheel, so these tests exercise the same path as ``pip install`` without touching the venv.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_pipeline_support import Registry, build_registry

from scanner import plugins
from scanner.pipeline import scan_path
from scanner.report import Verdict

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
ADAPTER_TEMPLATE = '''
from scanner.hookspecs import hookimpl


class Adapter:
    name = {adapter!r}

    def claims(self, path):
        return False

    def load(self, path, ctx):
        raise NotImplementedError


@hookimpl
def register_adapters(register):
    register(Adapter())
'''


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh site directory on sys.path; plugin state is reset before and after."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(plugins.LOAD_ENV, raising=False)
    before = set(sys.modules)
    plugins.reset_plugins()
    yield root
    plugins.reset_plugins()
    for name in set(sys.modules) - before:
        if name.startswith("example_"):
            del sys.modules[name]


def make_dist(site: Path, dist: str, module: str, source: str, *, entry: str | None = None,
              version: str = "1.2.3") -> None:
    """Write ``module.py`` and ``<dist>-<version>.dist-info`` declaring it in the ``scanner`` group."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[scanner]\n{entry or module} = {module}\n")


def _doc_example() -> str:
    """The adapter example in docs/plugins.md (the first python block), so the docs are tested."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, "docs/plugins.md lost its example"
    return str(blocks[0])


def test_example_plugin_from_docs_scans_a_model(site: Path, tmp_path_factory: pytest.TempPathFactory,
                                                tmp_path: Path) -> None:
    make_dist(site, "scanner-example", "example_coopx", _doc_example(), entry="coopx")
    infos = {i.name: i for i in plugins.plugin_infos()}
    assert infos["coopx"].distribution == "scanner-example"
    assert infos["coopx"].version == "1.2.3"
    assert infos["coopx"].hooks == ("register_adapters",)
    assert {"coop", "safetensors"} <= set(infos)  # the first-party plugins load through the same door
    assert plugins.adapter_owners()["coopx"] == "coopx"

    registry: Registry = build_registry(tmp_path_factory.getbasetemp() / "scan-models")
    from scanner.clip import BUNDLED_NAME, create_backbone
    from scanner.prompting import CoOpLearner

    learner = CoOpLearner(create_backbone(BUNDLED_NAME, seed=0), ["cat", "dog"], n_ctx=4)
    model = tmp_path / "plain.coopx"
    torch.save(learner.state_dict(), model)
    report = scan_path(model, registry.settings())
    (m,) = report.models
    assert m.adapter == "coopx"
    assert m.backbone_sha256 == registry.backbone_sha256, m.message  # loaded through the plugin
    assert m.verdict is not Verdict.SKIPPED


def test_load_plugins_env_restricts(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "scanner-example-a", "example_a", ADAPTER_TEMPLATE.format(adapter="a"))
    make_dist(site, "scanner-example-b", "example_b", ADAPTER_TEMPLATE.format(adapter="b"))

    monkeypatch.setenv(plugins.LOAD_ENV, "example_a")
    assert [i.name for i in plugins.plugin_infos()] == ["example_a"]
    assert [a.name for a in plugins.adapters()] == ["a"]
    assert "example_b" not in sys.modules  # not even imported

    plugins.reset_plugins()
    monkeypatch.setenv(plugins.LOAD_ENV, " scanner-example-b , coop")  # distribution names work too
    assert [i.name for i in plugins.plugin_infos()] == ["coop", "example_b"]

    plugins.reset_plugins()
    monkeypatch.setenv(plugins.LOAD_ENV, "")
    assert plugins.plugin_infos() == []
    assert plugins.adapters() == []


def test_explicit_list_overrides_and_reloads(site: Path) -> None:
    make_dist(site, "scanner-example-a", "example_a", ADAPTER_TEMPLATE.format(adapter="a"))
    plugins.load_plugins()
    assert "a" in {a.name for a in plugins.adapters()}
    plugins.load_plugins(["safetensors"])  # e.g. load_plugins from scanner.toml
    assert [a.name for a in plugins.adapters()] == ["safetensors"]


def test_unknown_plugin_name_is_an_error(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugins.LOAD_ENV, "coop,nosuchplugin")
    with pytest.raises(plugins.PluginError, match=r"nosuchplugin.*installed: .*coop"):
        plugins.load_plugins()


def test_duplicate_adapter_name_names_both_plugins(site: Path) -> None:
    make_dist(site, "scanner-example-a", "example_a", ADAPTER_TEMPLATE.format(adapter="dup"))
    make_dist(site, "scanner-example-b", "example_b", ADAPTER_TEMPLATE.format(adapter="dup"))
    with pytest.raises(plugins.PluginError, match="'dup' is registered by both plugin 'example_a' and plugin "
                                                  "'example_b'"):
        plugins.adapters()


def test_adapter_clashing_with_first_party_name(site: Path) -> None:
    make_dist(site, "scanner-example-a", "example_a", ADAPTER_TEMPLATE.format(adapter="coop"))
    with pytest.raises(plugins.PluginError, match="'coop' is registered by both plugin 'coop' and plugin "
                                                  "'example_a'"):
        plugins.adapters()


def test_unknown_hook_fails_check_pending(site: Path) -> None:
    source = ("from scanner.hookspecs import hookimpl\n\n"
              "@hookimpl\ndef register_adaptors(register):\n    pass\n")
    make_dist(site, "scanner-example-a", "example_a", source)
    with pytest.raises(plugins.PluginError, match="register_adaptors"):
        plugins.load_plugins()


def test_broken_import_names_the_plugin(site: Path) -> None:
    make_dist(site, "scanner-example-a", "example_a", "raise ImportError('needs a missing library')\n")
    with pytest.raises(plugins.PluginError, match=r"plugin 'example_a' .*scanner-example-a.*missing library"):
        plugins.load_plugins()


def test_invalid_adapter_object_is_rejected(site: Path) -> None:
    source = ("from scanner.hookspecs import hookimpl\n\nclass A:\n    name = 'Bad Name'\n\n"
              "@hookimpl\ndef register_adapters(register):\n    register(A())\n")
    make_dist(site, "scanner-example-a", "example_a", source)
    with pytest.raises(plugins.PluginError, match=r"example_a.*invalid adapter"):
        plugins.adapters()
