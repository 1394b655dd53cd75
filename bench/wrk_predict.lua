-- wrk's script for the benchmarks: POST one image to /predict on every connection, back to back
-- (a closed loop of wrk's -c connections), and write one line per answer for the benchmark.
--
--   wrk -c 64 -d 20s -s bench/wrk_predict.lua http://127.0.0.1:5000/predict -- IMAGE OUT [raw]
--
-- IMAGE is sent as the classic tutorial's multipart/form-data field `image`, or with `raw` as the
-- body itself (Content-Type image/jpeg). OUT gets "<seconds> <status> <X-Batch-Size>
-- <X-Inference-Ms>" per answer (seconds on the monotonic clock, which the benchmark reads too),
-- then "# latency <p50> <p90> <p99> <max>" in milliseconds and "# errors <count>".
-- wrk is a C program: its CPU per request is a small fraction of a Python client's, and it shares
-- the machine with the service it measures.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *now);
]]
local CLOCK_MONOTONIC = 1
local now_buffer = ffi.new("bench_timespec[1]")

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now_buffer)
  return tonumber(now_buffer[0].tv_sec) + tonumber(now_buffer[0].tv_nsec) * 1e-9
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local image = file:read("*a")
  file:close()
  out_path = args[2]  -- (globals: done() reads them through thread:get)
  wrk.method = "POST"
  if args[3] == "raw" then
    wrk.headers["Content-Type"] = "image/jpeg"
    wrk.body = image
  else
    local boundary = "benchmarkboundary7MA4YWxkTrZu0gW"
    wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
    wrk.body = "--" .. boundary .. "\r\n" ..
        'Content-Disposition: form-data; name="image"; filename="image.jpg"\r\n' ..
        "Content-Type: image/jpeg\r\n\r\n" .. image .. "\r\n--" .. boundary .. "--\r\n"
  end
  answers = {}
end

function response(status, headers, body)
  local n = #answers
  answers[n + 1] = now()
  answers[n + 2] = status
  answers[n + 3] = tonumber(headers["X-Batch-Size"]) or 0
  answers[n + 4] = tonumber(headers["X-Inference-Ms"]) or 0
end

function done(summary, latency, requests)
  local out = assert(io.open(threads[1]:get("out_path"), "w"))
  for _, thread in ipairs(threads) do
    local got = thread:get("answers")
    for i = 1, #got, 4 do
      out:write(string.format("%.6f %d %d %.1f\n", got[i], got[i + 1], got[i + 2], got[i + 3]))
    end
  end
  out:write(string.format("# latency %.1f %.1f %.1f %.1f\n", latency:percentile(50) / 1000,
      latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
  local errors = summary.errors
  out:write(string.format("# errors %d\n", errors.connect + errors.read + errors.write +
      errors.status + errors.timeout))
end
