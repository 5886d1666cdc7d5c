"""The front door: every request on every port comes through here, and through one policy.

connection (HTTP/1.1 on httptools) -> routing (which route, which key) -> policy (request id,
limits, token, headers, metrics, access log) -> the route's handler (server/apis) -> responses.
"""
