"""The data plane: typed messages (:mod:`.frames`) and the pyzmq sockets that carry them
(:mod:`.sockets`). Engine and coordinator both speak it; it imports neither."""
from .frames import Error, Forward, FrameError, Free, Kind, Message, Ping, Shutdown, Token, decode, encode
from .sockets import AsyncInbox, AsyncOutbox, Inbox, Outbox

__all__ = ["Forward", "Token", "Free", "Error", "Ping", "Shutdown", "Message", "Kind", "FrameError",
           "encode", "decode", "Inbox", "Outbox", "AsyncInbox", "AsyncOutbox"]
