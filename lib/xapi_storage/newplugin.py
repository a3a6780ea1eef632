"""`xapi-storage new-plugin volume|datapath NAME`: write a plugin package to fill in.

The package holds one module with every method of the plugin kind's interfaces written out
(signature and documentation from the schemas), `Plugin.query` answering, and every other
method raising `Unimplemented` under `@base.unimplemented`, so that `xapi-storage install`
lays no executable for it (and the daemon advertises no capability for it) until the vendor
removes the decorator; an entry point, so that `xapi-storage install` finds the plugin; and a
test that installs it into a temporary root and runs the conformance suite on it.

Everything is written into a new directory beside the target and renamed into place, so a
failure leaves nothing behind.
"""

import keyword
import os
import re
import shutil
import sys
import tempfile
import textwrap

HELP = "write a new plugin package (volume or datapath) wired to the installer and conformance"

_SRTYPE = re.compile(r"\A[a-z0-9][a-z0-9_-]*\Z")
_SCHEME = re.compile(r"\A[a-z][a-z0-9+.-]*\Z")
_PACKAGE = re.compile(r"\A[a-z_][a-z0-9_]*\Z")


class TemplateError(Exception):
    """A bad name or target; the message says what to give instead."""


def add_arguments(parser):
    parser.add_argument("kind", choices=("volume", "datapath"),
                        help="volume (SRs and volumes) or datapath (connects a volume's URI to a "
                             "domain)")
    parser.add_argument("name", metavar="NAME",
                        help="volume: the SR type, e.g. acme (plugin org.xen.xapi.storage.acme); "
                             "datapath: the URI scheme it serves, e.g. acme+nbd")
    parser.add_argument("--dir", metavar="DIR",
                        help="where to write the package (default ./xapi-storage-NAME); must not "
                             "exist or be empty")
    parser.add_argument("--package", metavar="PKG",
                        help="the Python package's name (default NAME with - + . as _ , then "
                             "_storage)")
    parser.add_argument("--vendor", default="Example Inc", help="for Plugin.query and setup.cfg")


def package_name(name):
    pkg = re.sub(r"[^a-z0-9_]", "_", name.lower()) + "_storage"
    return pkg if not pkg[0].isdigit() else "p" + pkg


def plan(kind, name, package=None, vendor="Example Inc"):
    """{relative path: text} of the package. Raises TemplateError for a bad name."""
    from .sdk import schema
    if kind == "volume" and not _SRTYPE.match(name):
        raise TemplateError(f"{name!r} is no SR type: lower-case letters, digits, - and _, no dots "
                            "(xapi takes the SR type from the last dot of the plugin's name)")
    if kind == "datapath" and not _SCHEME.match(name):
        raise TemplateError(f"{name!r} is no URI scheme: [a-z][a-z0-9+.-]*")
    package = package or package_name(name)
    if not _PACKAGE.match(package) or keyword.iskeyword(package):
        raise TemplateError(f"{package!r} is not a Python package name")
    if any(c in vendor for c in "\n\"\\"):
        raise TemplateError("--vendor must be one line without quotes or backslashes")
    module = f"{package}.{kind}"
    entry = f"org.xen.xapi.storage.{name}" if kind == "volume" else name
    group = f"xapi_storage.{kind}"
    files = {
        "setup.py": "from setuptools import setup\n\nsetup()\n",
        "setup.cfg": _SETUP_CFG.format(dist=f"xapi-storage-{name}", vendor=vendor, group=group,
                                       entry=entry, module=module),
        f"{package}/__init__.py": f'"""The {name} {kind} plugin for the Xapi toolstack."""\n',
        f"{package}/{kind}.py": _module(kind, name, vendor, schema),
        "tests/test_conformance.py": _test(kind, entry, module),
        "README.md": _README.format(name=name, kind=kind, entry=entry, module=module,
                                    package=package, group=group),
    }
    return files


def write(target, files):
    """Write `files` into the directory `target` (absent or empty): assembled in a temporary
    directory beside it, then renamed into place."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise TemplateError(f"{parent} does not exist")
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target) or os.listdir(target):
            raise TemplateError(f"{target} exists and is not an empty directory: left untouched")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        for rel, text in sorted(files.items()):
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):
            os.rmdir(target)            # empty, checked above
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def run(args):
    try:
        files = plan(args.kind, args.name, args.package, args.vendor)
        target = write(args.dir or f"xapi-storage-{args.name}", files)
    except (TemplateError, OSError) as e:
        print(f"xapi-storage new-plugin: {e}", file=sys.stderr)
        return 2
    print(f"{target}: {', '.join(sorted(files))}")
    print(f"next: pip install -e {target} && cd {target} && python -m pytest tests  "
          "(see its README.md)")
    return 0


# --- the module -------------------------------------------------------------------------------

def _module(kind, name, vendor, schema):
    kinds = schema.KINDS[kind]
    out = [f'"""The {name} {kind} plugin: fill in each method, then remove its @base.unimplemented.',
           "",
           "Each method is called with the interface's named arguments, dbg first, already checked",
           "against the schema; return plain JSON values (optional record fields omitted, never None).",
           "Raise xapi_storage.sdk.errors (e.g. errors.Volume_does_not_exist(key)); anything else",
           "reaches xapi as SR_BACKEND_FAILURE [TypeName, message]. Keep module-level imports lean:",
           "every call is a new process. Docs: xapi-storage-suite's docs/sdk.md and docs/vendors/.",
           '"""',
           "",
           "from xapi_storage.sdk import base, errors",
           "", ""]
    if kind == "datapath":
        out[out.index("from xapi_storage.sdk import base, errors")] = (
            "from xapi_storage.datapath.lifecycle import Lifecycle\n"
            "from xapi_storage.sdk import base, errors")
    for itf_name in kinds:
        itf = schema.interface(itf_name)
        if itf_name == "Datapath":
            out.extend(_DATAPATH_CLASS.format(name=name).splitlines())
            out.append("")
            continue
        out.append(f"class {itf_name}(base.{itf_name}):")
        for m in itf.methods.values():
            params = ", ".join(["self"] + m.param_names)
            result = schema.type_name(itf, m.result_schema)
            doc = textwrap.wrap(f"{m.wire_name} -> {result}. {m.description}", 88)
            if m.wire_name == "Plugin.query":
                out.append(f"    def {m.name}({params}):")
                out.extend(_docstring(doc))
                out.extend(_query_body(kind, name, vendor))
            else:
                out.append("    @base.unimplemented")
                out.append(f"    def {m.name}({params}):")
                out.extend(_docstring(doc))
                out.append(f'        raise errors.Unimplemented("{m.wire_name}: not written yet in '
                           f'the {name} plugin")')
            out.append("")
        out.append("")
    table = ", ".join(f'"{i}": {i}' for i in kinds)
    out.append(f"IMPLEMENTATIONS = {{{table}}}")
    return "\n".join(out) + "\n"


def _docstring(lines):
    if len(lines) == 1:
        return [f'        """{lines[0]}"""']
    return [f'        """{lines[0]}'] + [f"        {l}" for l in lines[1:]] + ['        """']


def _query_body(kind, name, vendor):
    config = ('{"path": "describe each device-config key your SR.create and SR.attach need"}'
              if kind == "volume" else "{}")
    return [
        "        return {",
        f'            "plugin": "{name}",',
        f'            "name": "{name} {kind} plugin",',
        f'            "description": "TODO: one sentence on what this plugin stores and how",',
        f'            "vendor": "{vendor}",',
        f'            "copyright": "(C) {vendor}",',
        '            "version": "0.1",',
        '            "required_api_version": "5.0",',
        ("            # features xapi may use; declare one only once its methods work (see\n"
         "            # docs/vendors/guide.md): e.g. VDI_SNAPSHOT needs Volume.snapshot"
         if kind == "volume" else
         "            # NONPERSISTENT once open_hook/close_hook discard a non-persistent disk's\n"
         "            # writes; VDI_MIRROR_IN with Datapath.import_activate (see docs/vendors/)"),
        '            "features": [],',
        f"            \"configuration\": {config},",
        '            "required_cluster_stack": [],',
        "        }",
    ]


def _test(kind, entry, module):
    if kind == "volume":
        return _VOLUME_TEST.format(entry=entry, module=module)
    return _DATAPATH_TEST.format(entry=entry, module=module)


_DATAPATH_CLASS = '''\
class Datapath(Lifecycle):
    """The seven Datapath calls (open, attach, activate, activate_readonly, deactivate, detach,
    close) are written once in xapi_storage.datapath.lifecycle.Lifecycle: idempotent,
    reference-counted per (volume URI, domain), read-only and read-write activations never
    together, detach never failing, crash-safe state. Fill in the hooks below."""

    SCHEME = "{name}"

    def setup(self, uri, readonly=False):
        """First attach of the volume `uri` on this host: acquire what it needs (a device, a
        connection) and return it as a JSON object, given to the other hooks. Must find and
        reuse what a killed earlier setup of the same uri left."""
        raise errors.Unimplemented("Datapath.attach: setup not written yet in the {name} plugin")

    def backend(self, uri, domain, resources):
        """The attach result for `domain`: {{"implementations": [["XenDisk", {{...}}],
        ["BlockDevice", {{"path": "/dev/..."}}]]}}. A guest needs XenDisk; dom0 (xapi's copies,
        static-vdis) needs BlockDevice, File (under /dev/) or Nbd."""
        raise errors.Unimplemented("Datapath.attach: backend not written yet in the {name} plugin")

    def activate_hook(self, uri, domain, resources, readonly):
        """Just before I/O for `domain` (inside a migration's downtime: be fast)."""

    def deactivate_hook(self, uri, domain, resources):
        """I/O has ended for `domain` (inside a migration's downtime: be fast)."""

    def teardown(self, uri, resources):
        """After the last detach: release what setup acquired (resources None: a setup was
        killed before it finished; find what it left by uri). Raise if something is left:
        the next call retries it."""
        raise errors.Unimplemented("Datapath.detach: teardown not written yet in the {name} plugin")
'''


_SETUP_CFG = """\
[metadata]
name = {dist}
version = 0.1
description = A storage plugin for the Xapi toolstack (SMAPIv3)
author = {vendor}

[options]
packages = find:
python_requires = >=3.6
install_requires =
    xapi-storage-suite

[options.packages.find]
exclude = tests

[options.extras_require]
test =
    pytest

[options.entry_points]
{group} =
    {entry} = {module}
"""

_VOLUME_TEST = '''\
"""The conformance suite on this plugin, laid out by the real installer into a temporary root.
Fixtures install_plugin and conformance come with xapi-storage-suite (xapi_storage.testing)."""


def configuration(tmp_path):
    """The device-config of a test SR: edit to reach your storage (a scratch LUN, a pool)."""
    return {{"path": str(tmp_path / "sr")}}


def test_conformance(install_plugin, conformance, tmp_path):
    plugin_dir = install_plugin("volume", "{entry}", "{module}")
    conformance(plugin_dir, configuration=configuration(tmp_path)).assert_ok()
'''

_DATAPATH_TEST = '''\
"""This datapath plugin laid out by the real installer, and its Plugin.Query answered as the
daemon's registration asks for it; then `xapi-storage conformance` on it alone, on a scratch
file (see docs/vendors/guide.md of xapi-storage-suite, "Conformance of a datapath on its own").
Fixtures come with xapi-storage-suite (xapi_storage.testing)."""

import pytest

from xapi_storage.conformance.caller import Caller


def test_registers(install_plugin):
    plugin_dir = install_plugin("datapath", "{entry}", "{module}")
    out = Caller(plugin_dir).call("Plugin.query", {{"dbg": "register"}})
    assert out.ok, out.describe()
    assert out.value["required_api_version"] == "5.0"


@pytest.mark.skip(reason="the hooks of {module} are not written yet: fill in setup, backend "
                         "and teardown, make the URI below one your datapath serves, then "
                         "remove this line")
def test_conformance(install_plugin, conformance):
    plugin_dir = install_plugin("datapath", "{entry}", "{module}")
    conformance(plugin_dir, uris=["{entry}://{{file}}"]).assert_ok()
'''

_README = """\
# The {name} {kind} plugin

Made by `xapi-storage new-plugin {kind} {name}`. The plugin is `{module}`, registered in
`setup.cfg` under the entry point group `{group}` as `{entry}`.

    pip install -e .                       # with xapi-storage-suite
    python -m pytest tests                 # installs it into a temporary root, runs conformance
    xapi-storage install                   # lays it out in /usr/libexec/xapi-storage-script

Every method but `Plugin.query` is marked `@base.unimplemented`: the installer lays no
executable for it, so the toolstack neither calls it nor advertises its capability. Fill in a
method, remove its decorator, and the conformance checks that need it start to run. See
docs/vendors/guide.md of xapi-storage-suite for the order that gets a first SR working.
"""
