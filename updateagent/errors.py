"""The agent's typed exception hierarchy. Every error names the problem and where it is."""

from __future__ import annotations


class UpdateAgentError(Exception):
    """Base of every error the agent raises on purpose.

    ``transient`` is decided where the error is raised: True when the same request may well
    succeed soon (connection errors, timeouts, HTTP 5xx and 429), so the agent retries with
    exponential backoff; False (the default) when retrying soon cannot help (HTTP 4xx, a bad
    signature, a malformed manifest), so the agent keeps its normal check interval. Only the
    channel and the download raise transient errors.
    """

    def __init__(self, message: str = "", *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class GptError(UpdateAgentError):
    """A GPT that cannot be read or written (bad CRC, bad signature, no such slot)."""


class ChannelError(UpdateAgentError):
    """A channel that cannot be fetched or whose manifest is malformed."""


class SignatureError(ChannelError):
    """A manifest whose signature is missing, malformed, or from an untrusted key."""


class DownloadError(UpdateAgentError):
    """A server answer that is not what it claims, or a transfer that failed for good."""


class PayloadError(UpdateAgentError):
    """A payload that does not match its manifest (size, sha256, compression, slot size)."""


class PolicyRefused(UpdateAgentError):
    """A release the agent refuses by rule: a downgrade, a denied version, a dead end."""
