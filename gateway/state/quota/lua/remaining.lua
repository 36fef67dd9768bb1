-- What each budget has left. Read-only, so it also answers on a read-only replica.
-- KEYS: 5 per budget: requests bucket, tokens bucket, lease set, spend of the day, spend of the month.
-- ARGV: n budgets, then rpm, tpm per budget. Returns per budget: requests level * 1000, tokens level *
-- 1000, leases in use, spent today, spent this month (micro-units).
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local k = 5 * (i - 1)
  table.insert(out, math.floor(level(KEYS[k + 1], tonumber(ARGV[2 * i])) * 1000))
  table.insert(out, math.floor(level(KEYS[k + 2], tonumber(ARGV[2 * i + 1])) * 1000))
  table.insert(out, redis.call('ZCOUNT', KEYS[k + 3], '(' .. now, '+inf'))
  table.insert(out, tonumber(redis.call('GET', KEYS[k + 4]) or '0'))
  table.insert(out, tonumber(redis.call('GET', KEYS[k + 5]) or '0'))
end
return out
