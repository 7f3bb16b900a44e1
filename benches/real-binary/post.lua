-- wrk script: distinct ButterCMS page.published webhooks (a new dedup key per
-- request and per run), header-secret auth as in routes.yaml beside it.
local n = 0
local thread_id = 0
local run = os.time()
function setup(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end
request = function()
  n = n + 1
  local body = string.format('{"data":{"id":"product-launch-%d-%d-%d","buttercms_id":%d,"page_type":"landing","editor":"Marketing Team","name":"Product Launch Landing Page","timestamp":"2024-01-15T14:30:00","locale":null,"status":"published","updated":"2024-01-15T14:30:00.123456Z","published":"2024-01-15T14:30:00.123456Z","scheduled":null},"webhook":{"event":"page.published","target":"https://yourapp.com/webhooks/buttercms"}}', run, tid, n, n)
  return wrk.format("POST", "/hooks/buttercms", {["Content-Type"]="application/json", ["X-Webhook-Secret"]="bench-secret"}, body)
end
