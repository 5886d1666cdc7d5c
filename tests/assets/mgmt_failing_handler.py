"""A handler whose initialize always raises: registration must fail and roll back."""


class FailingHandler:
    def initialize(self, context):
        raise RuntimeError("mgmt_failing_handler refuses to load")

    def handle(self, data, context):
        return [b"unreachable" for _ in data]
