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


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
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
                # A new batch: cancellations were for the last one's requests.
                self._gone.clear()
                return frame
            self._gone.update(Cancel.from_meta(frame[1]).ids)

    def send(self, buffers: list[Buffer]) -> None:
        frames.send_frame(self.sock, buffers)

    def send_piece(self, piece: Piece, body: Buffer) -> None:
        self.send(frames.encode(frames.PIECE, piece, [body]))

    def gone(self, request_id: str) -> bool:
        """Whether the frontend said this request's client has gone; reads what has arrived, never waits."""
        while not self._eof and select.select([self.sock], [], [], 0)[0]:
            frame = frames.recv_frame(self.sock)
            if frame is None:
                self._eof = True
            elif frame[0] == frames.CANCEL:
                self._gone.update(Cancel.from_meta(frame[1]).ids)
            else:
                self._pending.append(frame)
        return request_id in self._gone
