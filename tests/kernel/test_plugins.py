import sys
import textwrap

import pluggy
import pytest

from llmos.kernel.plugins import BUILTIN_PLUGINS, collect, get_plugin_manager, plugin_names

PLUGIN = textwrap.dedent('''
    from llmos import hookimpl

    class LifoPolicy:
        name = "lifo"
        def rank(self, job, now):
            return (-job.id,)

    @hookimpl
    def llmos_register_policies(policies):
        policies.add("lifo", LifoPolicy)
''')


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A real distribution on sys.path with an ``llmos`` entry point, as pip would install it."""
    (tmp_path / "llmos_lifo.py").write_text(PLUGIN)
    dist = tmp_path / "llmos_lifo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmos-lifo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmos]\nlifo = llmos_lifo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lifo"
    sys.modules.pop("llmos_lifo", None)


def test_builtins_register_through_the_hooks():
    ext = collect(get_plugin_manager())
    assert "torch" in ext.drivers
    assert {"fifo", "priority"} <= set(ext.policies)
    assert "minilm" in ext.sources
    assert set(BUILTIN_PLUGINS) <= set(plugin_names(get_plugin_manager()))


def test_each_kernel_gets_a_fresh_manager():
    assert get_plugin_manager() is not get_plugin_manager()


def test_an_entry_point_plugin_is_loaded_like_a_builtin(third_party):
    pm = get_plugin_manager()
    assert third_party in plugin_names(pm)
    assert "lifo" in collect(pm).policies


def test_plugins_can_be_blocked_by_name(third_party):
    pm = get_plugin_manager(disabled=["lifo", "llmos.kernel.scheduler.fifo"])
    ext = collect(pm)
    assert "lifo" not in ext.policies and "fifo" not in ext.policies
    assert "priority" in ext.policies


def test_the_kernel_loads_no_shell_module_and_accepts_the_shells_hook():
    """Built-in plugins implement the shell's hook (compression's ``compress``): the kernel
    has no spec for it, accepts them (the ``llmos.hooks`` entry points name it) and never
    calls it."""
    assert not any(name.startswith("llmos.shell") for name in BUILTIN_PLUGINS)
    pm = get_plugin_manager()
    assert not pm.hook.llmos_register_shell_commands.has_spec()
    assert pm.hook.llmos_register_shell_commands.get_hookimpls()


def test_a_misspelled_hook_is_rejected_by_check_pending(tmp_path, monkeypatch):
    (tmp_path / "llmos_typo.py").write_text(
        "from llmos import hookimpl\n\n@hookimpl\ndef llmos_register_polices(policies):\n    pass\n")
    dist = tmp_path / "llmos_typo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmos-typo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmos]\ntypo = llmos_typo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(pluggy.PluginValidationError):
            get_plugin_manager()
    finally:
        sys.modules.pop("llmos_typo", None)
