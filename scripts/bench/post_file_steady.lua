-- POSTs the file named by $BODY_FILE as a raw body, like `curl -T`, and prints the steady
-- completion rate: responses between the first and the last gap of more than $BURST_GAP_MS
-- (default 50) ms, over the time between them. With batching, responses arrive in bursts (one
-- per batch), so this counts whole batches only. wrk's own requests/s also counts the start,
-- while the server still works off the warm-up run's queue (TorchServe finishes requests whose
-- connection has closed) and the pipeline fills, and loses the batch cut off at the end: up to
-- several batch times per run, 5-15% when a batch takes hundreds of milliseconds.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } marserve_timespec;
int clock_gettime(int clk_id, marserve_timespec *tp);
]]
local ts = ffi.new("marserve_timespec")
local function now()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"

local threads = {}
function setup(thread)
    table.insert(threads, thread)
end

times = {}
function response(status, headers, body)
    times[#times + 1] = now()
end

function done(summary, latency, requests)
    local gap = (tonumber(os.getenv("BURST_GAP_MS")) or 50) / 1000
    local all = {}
    for _, thread in ipairs(threads) do
        for _, t in ipairs(thread:get("times")) do
            all[#all + 1] = t
        end
    end
    table.sort(all)
    local first, last, bursts = nil, nil, 0
    for i = 1, #all - 1 do
        if all[i + 1] - all[i] > gap then
            first = first or i
            last = i
            bursts = bursts + 1
        end
    end
    if first ~= nil and last > first then
        io.write(string.format("Steady: %.3f requests/sec over %d bursts\n",
            (last - first) / (all[last] - all[first]), bursts - 1))
    end
end
