"""The one exception type a user sees: a single clear line naming the param or file at fault."""


class MlsaeError(Exception):
    """A bad input or unusable file. Stages print `error: <message>` and exit 1, writing nothing."""
