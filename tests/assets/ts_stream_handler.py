"""A TorchServe 0.12-style streaming handler: intermediate responses with
send_intermediate_predict_response, then the final output. Written as TorchServe's own LLM
examples write it; nothing in it knows about marserve.

A body ``N`` streams N intermediate pieces before the final one; any other body is answered in
one piece.
"""

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    bodies = [bytes(row.get("body") or b"").decode() for row in data]
    finals = []
    for idx, body in enumerate(bodies):
        if body.isdigit():
            for i in range(int(body)):
                send_intermediate_predict_response([f"piece {i};"] * len(bodies), {idx: context.get_request_id(idx)},
                                                   "Intermediate Prediction success", 200, context)
            finals.append("final.")
        else:
            finals.append(f"whole {body}")
    return finals
