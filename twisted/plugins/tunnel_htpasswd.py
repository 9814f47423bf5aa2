"""
The C{htpasswd:PATH} checker for C{--auth}: Apache htpasswd files with
bcrypt entries (C{htpasswd -B}).
"""

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(ICheckerFactory, IPlugin)
class HtpasswdCheckerFactory:
    """
    Makes L{tunnel.htpasswd.HtpasswdChecker}s for C{--auth htpasswd:PATH}.
    """

    authType = "htpasswd"
    authHelp = (
        "Checks user names and passwords against an Apache htpasswd file of "
        "bcrypt entries (made with htpasswd -B). The file is re-read when it "
        "changes; entries in other formats are refused at start-up."
    )
    argStringFormat = "A path to an htpasswd file with bcrypt entries."
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> object:
        """
        Read the file and make its checker.

        @param argstring: The path of the htpasswd file.
        @return: A L{tunnel.htpasswd.HtpasswdChecker} of the file.
        @raise tunnel.htpasswd.HtpasswdError: If the file cannot be read or
            parsed.
        """
        from tunnel.htpasswd import HtpasswdChecker

        return HtpasswdChecker(argstring)


theHtpasswdCheckerFactory = HtpasswdCheckerFactory()
