"""The worker's end of its socket: frames in and out, and while a batch runs, the frontend's word
that some of its clients have gone (``CANCEL``), read without waiting between streamed pieces."""

from __future__ import annotations

import select
import socket
from collections import deque
from typing import Any

from .. import frames
from ..frames import Buffer
from ..messages import Cancel, Piece

Frame = tuple[int, dict[str, Any], memoryview]

#: Cancelled request ids kept at most, for a pipelined worker (a cancellation can come after its
#: request was answered, and nothing else would ever remove it).
MAX_GONE = 4096


class Channel:
    """``pipelined``: one thread reads the socket (``recv``) while another runs batches and streams;
    cancellations are then noted by the reader alone, and ``gone`` only looks them up."""

    def __init__(self, sock: socket.socket, pipelined: bool = False) -> None:
        self.sock = sock
        self.pipelined = pipelined
        self._pending: deque[Frame] = deque()  # frames read early, while looking for cancellations
        self._eof = False
        self._gone: set[str] = set()

    def recv(self) -> Frame | None:
        """The next frame that is not a cancellation; None once the frontend has closed the socket."""
        while True:
            if self._pending:
                frame = self._pending.popleft()
            elif self._eof:
                return None
            else:
                received = frames.recv_frame(self.sock)
                if received is None:
                    return None
                frame = received
            if frame[0] != frames.CANCEL:
                if not self.pipelined:
                    # A new batch: cancellations were for the last one's requests.
                    self._gone.clear()
                return frame
            self._note(Cancel.from_meta(frame[1]).ids)

    def _note(self, ids: list[str]) -> None:
        if self.pipelined and len(self._gone) + len(ids) > MAX_GONE:
            self._gone.clear()  # set only by another thread; a set's clear and update are atomic
        self._gone.update(ids)

    def finished(self, request_ids: list[str]) -> None:
        """A pipelined worker has answered these requests: their cancellations, if any, are moot."""
        if self._gone:
            self._gone.difference_update(request_ids)

    def send(self, buffers: list[Buffer]) -> None:
        frames.send_frame(self.sock, buffers)

    def send_piece(self, piece: Piece, body: Buffer) -> None:
        self.send(frames.encode(frames.PIECE, piece, [body]))

    def gone(self, request_id: str) -> bool:
        """Whether the frontend said this request's client has gone; reads what has arrived, never waits."""
        while not self.pipelined and not self._eof and select.select([self.sock], [], [], 0)[0]:
            frame = frames.recv_frame(self.sock)
            if frame is None:
                self._eof = True
            elif frame[0] == frames.CANCEL:
                self._gone.update(Cancel.from_meta(frame[1]).ids)
            else:
                self._pending.append(frame)
        return request_id in self._gone
