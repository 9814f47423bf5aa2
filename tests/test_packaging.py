"""
Tests for how C{tunnel} is packaged: the wheel's contents, and that twistd
finds the C{connect-proxy} plugin after a regular or an editable install.

These tests build and install the project from its source tree, so they
need its build backend, hatchling, importable in the environment running
them (the builds run without isolation, so nothing is downloaded).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

PROJECT_NAME = "tunnel"
PLUGIN_NAME = "connect-proxy"
PLUGIN_MODULE = "twisted/plugins/connect_proxy.py"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Upper bounds, not expectations: each step normally takes a second or two.
BUILD_TIMEOUT = 120.0
PYTHON_TIMEOUT = 60.0

# Run in a child interpreter: report which service-maker plugins Twisted's
# plugin system (what twistd uses) finds, and where the project was imported
# from.
PLUGIN_PROBE = """\
import json
import sysconfig

import twisted.plugins
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

tapnames = sorted(plugin.tapname for plugin in getPlugins(IServiceMaker))

import tunnel
from twisted.plugins import connect_proxy

print(json.dumps({
    "tapnames": tapnames,
    "tunnel": tunnel.__file__,
    "plugin": connect_proxy.__file__,
    "pluginPath": list(twisted.plugins.__path__),
    "purelib": sysconfig.get_path("purelib"),
}))
"""


# Run in the new environment before anything is installed: where it installs
# packages, and what it imports from already.
BASELINE_PROBE = (
    "import json, sys, sysconfig;"
    " print(json.dumps([sysconfig.get_path('purelib'), sys.path]))"
)


def hasModule(name: str) -> bool:
    """
    Tell whether the top-level module C{name} can be imported here.
    """
    return importlib.util.find_spec(name) is not None


def requireProjectTree() -> None:
    """
    Skip unless the tests run from the project's source tree.
    """
    if not os.path.isfile(os.path.join(PROJECT_ROOT, "pyproject.toml")):
        raise SkipTest(f"no pyproject.toml in {PROJECT_ROOT}: not a source tree")


def requireBackend() -> None:
    """
    Skip unless the build backend can run without build isolation.
    """
    requireProjectTree()
    if not hasModule("hatchling"):
        raise SkipTest(
            "hatchling, the build backend, is not importable here, and these"
            " tests build without isolation (add hatchling to the test deps)"
        )


def childEnvironment() -> dict[str, str]:
    """
    The environment for child interpreters: this one's, without what would
    add to or replace their C{sys.path}.
    """
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def sourcePlugins() -> list[str]:
    """
    The plugin modules in the source tree's C{twisted/plugins}, as paths
    relative to the project root, C{/}-separated.
    """
    directory = os.path.join(PROJECT_ROOT, "twisted", "plugins")
    return sorted(
        f"twisted/plugins/{name}"
        for name in os.listdir(directory)
        if name.endswith(".py") and name != "__init__.py"
    )


def canonicalName(name: str) -> str:
    """
    Normalise a distribution name as PEP 503 does.
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def ownedPaths(siteDir: str) -> set[str]:
    """
    The paths, relative to C{siteDir} and C{/}-separated, of the files an
    installed copy of this project owns there (per its C{RECORD}): for an
    editable install, the C{.pth} file or import hook that points back at a
    source tree.
    """
    owned = set()
    for dist in importlib.metadata.distributions(path=[siteDir]):
        if canonicalName(dist.metadata["Name"] or "") != PROJECT_NAME:
            continue
        for entry in dist.files or ():
            relative = os.path.relpath(str(dist.locate_file(entry)), siteDir)
            if not relative.startswith(os.pardir):
                owned.add(relative.replace(os.sep, "/"))
    return owned


def isProjectPath(relative: str, owned: set[str]) -> bool:
    """
    Tell whether C{relative}, a C{/}-separated path in a site directory,
    belongs to an installed copy of this project (or is Twisted's plugin
    cache, which may describe its plugins).
    """
    parts = relative.split("/")
    if parts[0] == PROJECT_NAME or (
        parts[0].startswith(f"{PROJECT_NAME}-") and parts[0].endswith(".dist-info")
    ):
        return True
    if parts[:2] == ["twisted", "plugins"]:
        # The plugin modules, and their bytecode in __pycache__.
        stems = {os.path.basename(path)[: -len(".py")] for path in sourcePlugins()}
        if parts[-1] == "dropin.cache" or parts[-1].split(".")[0] in stems:
            return True
    return relative in owned


def mirrorWithoutProject(source: str, destination: str) -> None:
    """
    Make C{destination} a copy of the site directory C{source} made of
    symlinks, leaving out every file of an installed copy of this project.

    Directories holding such files (C{twisted/plugins}, where a regular
    install puts the plugin beside Twisted's own) are recreated, not linked,
    so that those files can be left out.
    """
    owned = ownedPaths(source)
    descend = {"twisted", "twisted/plugins", "twisted/plugins/__pycache__"}
    for path in owned:
        parts = path.split("/")
        descend.update("/".join(parts[:end]) for end in range(1, len(parts)))

    def mirror(src: str, dst: str, prefix: str) -> None:
        os.mkdir(dst)
        for name in sorted(os.listdir(src)):
            relative = prefix + name
            srcChild = os.path.join(src, name)
            if isProjectPath(relative, owned):
                continue
            if relative in descend and os.path.isdir(srcChild):
                mirror(srcChild, os.path.join(dst, name), relative + "/")
            else:
                os.symlink(srcChild, os.path.join(dst, name))

    mirror(source, destination, "")


class PackagingTestCase(SynchronousTestCase):
    """
    Helpers to run commands, with a timeout, from a test case.
    """

    def makeDirectory(self) -> str:
        """
        Create and return a new, empty, absolute temporary directory.
        """
        temporary: str = self.mktemp()
        path = os.path.abspath(temporary)
        os.makedirs(path)
        return path

    def runCommand(
        self,
        argv: Sequence[str],
        cwd: str,
        timeout: float = PYTHON_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """
        Run C{argv} in C{cwd}, fail the test unless it exits with status 0
        within C{timeout} seconds, and return what it wrote to stdout.
        """
        command = " ".join(arg if len(arg) < 60 else arg[:57] + "..." for arg in argv)
        try:
            result = subprocess.run(
                list(argv),
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self.fail(f"{command} took longer than {timeout} seconds")
        if result.returncode != 0:
            self.fail(
                f"{command} exited with status {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result.stdout

    def probePlugins(
        self, python: str, cwd: str, env: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """
        Run L{PLUGIN_PROBE} with the interpreter C{python} in C{cwd} and
        return what it reports.
        """
        output = self.runCommand([python, "-c", PLUGIN_PROBE], cwd, env=env)
        report: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
        return report


class WheelTests(PackagingTestCase):
    """
    Tests for the wheel built from the source tree.
    """

    def buildWheel(self) -> list[str]:
        """
        Build the wheel from the source tree without isolation and return the
        names of its entries.
        """
        requireBackend()
        outdir = self.makeDirectory()
        if hasModule("build"):
            argv = [sys.executable, "-m", "build", "--wheel", "--no-isolation"]
            argv += ["--outdir", outdir, PROJECT_ROOT]
        elif hasModule("pip"):
            argv = [sys.executable, "-m", "pip", "wheel", "--no-deps"]
            argv += [
                "--no-build-isolation",
                "--no-index",
                "--disable-pip-version-check",
            ]
            argv += ["--wheel-dir", outdir, PROJECT_ROOT]
        else:
            raise SkipTest("neither build nor pip is importable to build a wheel")
        self.runCommand(argv, outdir, timeout=BUILD_TIMEOUT)
        wheels = [name for name in os.listdir(outdir) if name.endswith(".whl")]
        self.assertEqual(len(wheels), 1, f"expected one wheel, found {wheels}")
        with zipfile.ZipFile(os.path.join(outdir, wheels[0])) as wheel:
            return wheel.namelist()

    def test_containsPackageAndPlugin(self) -> None:
        """
        The wheel ships the C{tunnel} package and the twistd plugin module at
        C{twisted/plugins/connect_proxy.py}, where Twisted's plugin system
        looks for it once installed.
        """
        names = self.buildWheel()
        self.assertIn("tunnel/__init__.py", names)
        self.assertIn("tunnel/tap.py", names)
        self.assertIn(PLUGIN_MODULE, names)

    def test_typed(self) -> None:
        """
        The wheel ships C{tunnel/py.typed} (PEP 561), so that type checkers
        use the package's own annotations in the applications that import
        it.
        """
        names = self.buildWheel()
        self.assertIn("tunnel/py.typed", names)

    def test_noTwistedPackageFiles(self) -> None:
        """
        The wheel ships neither C{twisted/__init__.py} nor
        C{twisted/plugins/__init__.py}, which would overwrite Twisted's own
        when installed, nor any C{dropin.cache} left behind by running
        Twisted's plugin system in the source tree.
        """
        names = self.buildWheel()
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual(
            [name for name in names if name.split("/")[-1] == "dropin.cache"], []
        )

    def test_allPlugins(self) -> None:
        """
        The wheel ships every plugin module of the source tree's
        C{twisted/plugins}.
        """
        names = self.buildWheel()
        plugins = sourcePlugins()
        self.assertIn(PLUGIN_MODULE, plugins)
        self.assertEqual([path for path in plugins if path not in names], [])

    def test_nothingElse(self) -> None:
        """
        Everything in the wheel is the C{tunnel} package, a plugin module of
        the source tree's C{twisted/plugins} or the wheel's metadata: no
        tests, no caches, nothing more under C{twisted/}.
        """
        names = self.buildWheel()
        plugins = sourcePlugins()
        strays = [
            name
            for name in names
            if name not in plugins
            and not name.startswith("tunnel/")
            and not re.match(r"tunnel-[^/]+\.dist-info/", name)
        ]
        self.assertEqual(strays, [])
        self.assertEqual([name for name in names if "__pycache__" in name], [])


class InstalledPluginTests(PackagingTestCase):
    """
    Tests that twistd finds the plugin in the environment running the tests.
    """

    def test_pluginListed(self) -> None:
        """
        Twisted's plugin system, run in a fresh interpreter of this
        environment outside the source tree, lists C{connect-proxy} among
        the service makers.
        """
        report = self.probePlugins(sys.executable, self.makeDirectory())
        self.assertIn(PLUGIN_NAME, report["tapnames"])

    def test_twistdHelp(self) -> None:
        """
        C{twistd --help} lists the C{connect-proxy} subcommand, and
        C{twistd connect-proxy --help} loads the plugin's options.
        """
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        cwd = self.makeDirectory()
        self.assertRegex(
            self.runCommand([*twistd, "--help"], cwd), rf"(?m)^\s+{PLUGIN_NAME}\s"
        )
        self.assertIn(
            "--listen=", self.runCommand([*twistd, PLUGIN_NAME, "--help"], cwd)
        )


class FreshInstallTests(PackagingTestCase):
    """
    Tests that installing the project, editable or not, into a new
    environment makes twistd find the plugin from that install.

    The new environment is a virtual environment without pip. It reaches
    this environment's packages (Twisted, hatchling, pip), so that nothing
    is downloaded, through a copy made of symlinks of the directories on
    this environment's C{sys.path}, less the source tree and every file of
    any copy of this project installed here. So the only C{tunnel} and
    C{connect_proxy} the new environment can find are those of the install
    under test. (C{--system-site-packages} would not do: from a virtual
    environment, as the one running the tests usually is, it reaches the
    base interpreter's site-packages, not this environment's.)
    """

    def makeEnvironment(self) -> tuple[str, str, dict[str, str]]:
        """
        Create a new virtual environment and return its interpreter, a
        working directory outside the source tree, and the environment
        variables to run it with.
        """
        requireBackend()
        if not hasModule("pip"):
            raise SkipTest("pip is not importable here")
        base = self.makeDirectory()
        venv = os.path.join(base, "venv")
        cwd = os.path.join(base, "cwd")
        os.mkdir(cwd)
        env = childEnvironment()
        self.runCommand(
            [sys.executable, "-m", "venv", "--without-pip", venv], base, env=env
        )
        python = os.path.join(
            venv, "Scripts" if sys.platform == "win32" else "bin", "python"
        )
        purelib, baseline = json.loads(
            self.runCommand([python, "-c", BASELINE_PROBE], cwd, env=env)
        )

        # What this environment imports from, besides what the new one
        # already has (the standard library): site directories and the
        # directories their .pth files added, but not the source tree.
        directories = [
            entry
            for entry in dict.fromkeys(sys.path)
            if entry
            and os.path.isdir(entry)
            and entry not in baseline
            # The source tree itself, not what lies inside it: tox keeps
            # its environments in .tox under the project root.
            and os.path.realpath(entry)
            not in (os.path.realpath(PROJECT_ROOT), os.path.realpath(os.getcwd()))
        ]
        lines = []
        for index, directory in enumerate(directories):
            mirrored = os.path.join(base, f"path{index}")
            mirrorWithoutProject(directory, mirrored)
            lines.append(mirrored + "\n")
        # Plain lines: the mirrored .pth files are not run again, as they
        # could add directories that are not mirrored.
        with open(os.path.join(purelib, "zz_parent_path.pth"), "w") as pth:
            pth.writelines(lines)
        return python, cwd, env

    def install(self, editable: bool) -> tuple[str, dict[str, Any]]:
        """
        Install the project into a new environment, editable or not, and
        return the environment's site-packages and what L{PLUGIN_PROBE}
        reports there.
        """
        if editable and not hasModule("editables"):
            raise SkipTest(
                "editables is not importable here, and hatchling needs it to"
                " build an editable wheel without isolation (add editables to"
                " the test deps)"
            )
        python, cwd, env = self.makeEnvironment()
        argv = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
        argv += ["--no-index", "--ignore-installed", "--disable-pip-version-check"]
        argv += ["-e", PROJECT_ROOT] if editable else [PROJECT_ROOT]
        self.runCommand(argv, cwd, timeout=BUILD_TIMEOUT, env=env)
        report = self.probePlugins(python, cwd, env=env)
        return report["purelib"], report

    def assertSameFile(self, actual: str, expected: str) -> None:
        """
        Assert that C{actual} and C{expected} name the same file.
        """
        self.assertEqual(os.path.realpath(actual), os.path.realpath(expected))

    def assertPluginDirectory(self, report: dict[str, Any], expected: str) -> None:
        """
        Assert that Twisted's plugin system searches the directory
        C{expected}, as L{PLUGIN_PROBE} reports.
        """
        searched = [os.path.realpath(path) for path in report["pluginPath"]]
        self.assertIn(os.path.realpath(expected), searched)

    def test_regularInstall(self) -> None:
        """
        After C{pip install} of the source tree, Twisted's plugin system
        lists C{connect-proxy}, loaded from the plugin module the install
        put in the environment's own C{twisted/plugins}, and C{tunnel} is
        imported from the environment's site-packages.
        """
        purelib, report = self.install(editable=False)
        self.assertIn(PLUGIN_NAME, report["tapnames"])
        self.assertPluginDirectory(report, os.path.join(purelib, "twisted", "plugins"))
        self.assertSameFile(report["plugin"], os.path.join(purelib, PLUGIN_MODULE))
        self.assertSameFile(
            report["tunnel"], os.path.join(purelib, PROJECT_NAME, "__init__.py")
        )
        self.assertFalse(
            os.path.exists(os.path.join(purelib, "twisted", "__init__.py")),
            "the install shadows Twisted with its own twisted/__init__.py",
        )

    def test_editableInstall(self) -> None:
        """
        After C{pip install -e} of the source tree, Twisted's plugin system
        lists C{connect-proxy}, loaded from the plugin module in the source
        tree, and C{tunnel} is imported from the source tree: the editable
        install exposes C{twisted/plugins} as well as the package (an
        install that mapped only C{tunnel}, through an import hook, would
        not).
        """
        purelib, report = self.install(editable=True)
        self.assertIn(PLUGIN_NAME, report["tapnames"])
        self.assertPluginDirectory(
            report, os.path.join(PROJECT_ROOT, "twisted", "plugins")
        )
        self.assertSameFile(report["plugin"], os.path.join(PROJECT_ROOT, PLUGIN_MODULE))
        self.assertSameFile(
            report["tunnel"], os.path.join(PROJECT_ROOT, PROJECT_NAME, "__init__.py")
        )
        self.assertNotIn(
            PROJECT_NAME,
            os.listdir(purelib),
            "the editable install copied the package into site-packages",
        )
