-- POSTs the file named by $BODY_FILE as an Open Inference Protocol request: its JSON, or its JSON
-- followed by binary tensors (Triton's binary tensor data extension), in which case
-- $INFERENCE_HEADER_CONTENT_LENGTH gives the JSON's length. $CONTENT_TYPE is the body's type.
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"
local header_length = os.getenv("INFERENCE_HEADER_CONTENT_LENGTH")
if header_length and header_length ~= "" then
    wrk.headers["Inference-Header-Content-Length"] = header_length
end
