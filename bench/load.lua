-- wrk's script for every HTTP row of `python -m bench` (bench/wrk.py writes its inputs).
-- BENCH_BODY: a file holding the one request body; BENCH_PATHS: a file of paths, one a line,
-- taken round-robin (a stateful row's sessions, so in-flight requests step distinct ones).
-- Every answer's status is checked: a non-200 counts as an error, and the row is wrong.
local threads = {}

local function slurp(name)
  local file = assert(io.open(assert(os.getenv(name), name .. " is not set"), "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  body = slurp("BENCH_BODY")
  paths = {}
  for path in slurp("BENCH_PATHS"):gmatch("[^\n]+") do
    table.insert(paths, path)
  end
  turn = 0
  ok = 0
  errors = 0
  first = ""
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  turn = turn % #paths + 1
  return wrk.format("POST", paths[turn], headers, body)
end

function response(status, headers, answer)
  if status == 200 then
    ok = ok + 1
  else
    errors = errors + 1
    if first == "" then
      first = "HTTP " .. status .. ": " .. string.sub(answer or "", 1, 200)
    end
  end
end

function done(summary, latency, requests)
  local total_ok, total_errors, first_error = 0, 0, ""
  for _, thread in ipairs(threads) do
    total_ok = total_ok + thread:get("ok")
    total_errors = total_errors + thread:get("errors")
    if first_error == "" then first_error = thread:get("first") end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH ok=%d errors=%d socket_errors=%d duration_us=%d p50_us=%d p99_us=%d\n",
    total_ok, total_errors, e.connect + e.read + e.write + e.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
  io.write("BENCH first=" .. string.gsub(first_error, "\n", " ") .. "\n")
end
