-- Lower what a reservation holds to ARGV hold tokens and refund the rest; with fin = 1 end it and its
-- lease. Idempotent: the record says what is still held, so a retried call never refunds twice.
-- KEYS: the reservation's record, then 2 per budget: tokens bucket, lease set.
-- ARGV: n budgets, hold, lease id, fin (1 = end), then tpm per budget. Returns the tokens refunded.
local rec = KEYS[1]
local n, hold, lease, fin = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local give = 0
if redis.call('HGET', rec, 'st') == 'open' then
  local held = tonumber(redis.call('HGET', rec, 'tok'))
  give = math.max(0, held - hold)
  for i = 1, n do
    local tpm = tonumber(ARGV[4 + i])
    if give > 0 and tpm > 0 then
      local key = KEYS[2 * i]
      set_level(key, tpm, math.min(tpm, level(key, tpm) + give))
    end
  end
  if fin then redis.call('DEL', rec) else redis.call('HSET', rec, 'tok', held - give) end
end
-- Settled before, undone or expired: nothing is held; a lease left behind is ended all the same.
if fin then
  for i = 1, n do redis.call('ZREM', KEYS[2 * i + 1], lease) end
end
return give
