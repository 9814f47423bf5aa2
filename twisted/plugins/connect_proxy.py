"""
The twistd plugin: C{twistd connect-proxy}.
"""

from twisted.application.service import ServiceMaker

connectProxy = ServiceMaker(
    "tunnel HTTP CONNECT proxy",
    "tunnel.tap",
    "An HTTP CONNECT tunnelling proxy.",
    "connect-proxy",
)
