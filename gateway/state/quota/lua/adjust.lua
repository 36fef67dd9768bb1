-- Lower what a reservation holds to ARGV hold tokens (and hold spend) and refund the rest; with fin = 1
-- end it and its lease. Idempotent: the record says what is still held, so a retried call never refunds
-- twice.
-- KEYS: the reservation's record, then 4 per budget: tokens bucket, lease set, spend of the day and of
-- the month it was charged in.
-- ARGV: n budgets, hold, lease id, fin (1 = end), hold spend (-1 = unchanged), then 3 per budget: tpm,
-- day limit, month limit. Returns the tokens refunded.
local rec = KEYS[1]
local n, hold, lease, fin = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local hold_money = tonumber(ARGV[5])
local give = 0
if redis.call('HGET', rec, 'st') == 'open' then
  local held = tonumber(redis.call('HGET', rec, 'tok'))
  local held_money = tonumber(redis.call('HGET', rec, 'spend') or '0')
  local give_money = 0
  if hold_money >= 0 then give_money = math.max(0, held_money - hold_money) end
  give = math.max(0, held - hold)
  for i = 1, n do
    local a, k = 5 + 3 * (i - 1), 1 + 4 * (i - 1)
    local tpm = tonumber(ARGV[a + 1])
    if give > 0 and tpm > 0 then
      local key = KEYS[k + 1]
      set_level(key, tpm, math.min(tpm, level(key, tpm) + give))
    end
    for w = 1, 2 do
      -- A window whose key is gone (expired) has nothing left to refund.
      local key = KEYS[k + 2 + w]
      if give_money > 0 and tonumber(ARGV[a + 1 + w]) > 0 and redis.call('EXISTS', key) == 1 then
        redis.call('DECRBY', key, string.format('%d', give_money))
      end
    end
  end
  if fin then
    redis.call('DEL', rec)
  else
    redis.call('HSET', rec, 'tok', held - give, 'spend', string.format('%d', held_money - give_money))
  end
end
-- Settled before, undone or expired: nothing is held; a lease left behind is ended all the same.
if fin then
  for i = 1, n do redis.call('ZREM', KEYS[1 + 4 * (i - 1) + 2], lease) end
end
return give
