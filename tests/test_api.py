"""
Tests for the public API that C{tunnel/__init__.py} names.
"""

from __future__ import annotations

import importlib
import inspect

from twisted.trial.unittest import SynchronousTestCase

import tunnel

SUBMODULES = (
    "accesslog",
    "auth",
    "connector",
    "idle",
    "interfaces",
    "limits",
    "metrics",
    "policy",
    "proxyprotocol",
    "relay",
    "request",
    "rules",
    "service",
    "splice",
    "upstream",
)


class PublicNamesTests(SynchronousTestCase):
    """
    What an application imports from C{tunnel}.
    """

    def test_seamsExported(self) -> None:
        """
        What an application needs to plug into each seam is importable from
        C{tunnel} itself: the value a policy returns, the exception a
        connector raises, the avatar interface, the observers, the signal
        guard a composed service uses, the default connector's resolver,
        and the failed-login limit the factory's C{damper} takes.
        """
        for name in (
            "Denial",
            "AddressDenied",
            "IProxyUser",
            "ProxyUser",
            "portalFromCheckers",
            "AccessLogObserver",
            "ProxyMetrics",
            "metricsResource",
            "StopOnSignals",
            "ThreadedResolver",
            "LookupsBusy",
            "NoLocalPort",
            "SourceUnusable",
            "FailureDamper",
        ):
            self.assertIn(name, tunnel.__all__)

    def test_allDocumented(self) -> None:
        """
        Every name in C{tunnel.__all__}, and in each submodule's
        C{__all__}, exists and has a docstring of its own.
        """
        modules = [tunnel] + [
            importlib.import_module(f"tunnel.{name}") for name in SUBMODULES
        ]
        undocumented = []
        for module in modules:
            for name in module.__all__:
                value = getattr(module, name)
                if not (inspect.isclass(value) or inspect.isfunction(value)):
                    continue
                if not (value.__doc__ or "").strip():
                    undocumented.append(f"{module.__name__}.{name}")
        self.assertEqual(undocumented, [])
