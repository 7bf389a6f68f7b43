"""The data plane: typed messages (:mod:`.frames`) and the pyzmq sockets that carry them
(:mod:`.sockets`). Engine and coordinator both speak it; it imports neither."""
from .frames import NO_TOKEN, Copy, Error, msg_id, Forward, FrameError, Free, Kind, Message, Ping, Row, Sampled, Short, Shutdown, \
    TrainBackward, TrainForward, TrainLoss, TrainStep, TRAINING, decode, encode
from .sockets import AsyncInbox, AsyncOutbox, Inbox, Outbox

__all__ = ["Copy", "Forward", "Row", "Sampled", "Short", "NO_TOKEN", "Free", "Error", "Ping", "Shutdown", "Message", "Kind", "FrameError",
           "encode", "decode", "msg_id", "Inbox", "Outbox", "AsyncInbox", "AsyncOutbox", "TrainForward",
           "TrainBackward", "TrainLoss", "TrainStep", "TRAINING"]
