-- Take back a reservation whose outcome its caller never learned (the reserve call timed out: it may
-- have run, or may still run). Whatever it charged is refunded, its request too (the caller went on
-- without it), its lease ends, and a tombstone makes a reserve that runs later refuse to charge.
-- Idempotent. KEYS: the reservation's record, then 5 per budget: requests bucket, tokens bucket, lease
-- set, spend of the day, spend of the month. ARGV: n budgets, lease id, lease TTL (ms), then 4 per
-- budget: rpm, tpm, day limit, month limit.
local rec = KEYS[1]
local n, lease, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local st = redis.call('HGET', rec, 'st')
if st == 'undone' then return 0 end
if st == 'open' then
  local held = tonumber(redis.call('HGET', rec, 'tok'))
  local money = tonumber(redis.call('HGET', rec, 'spend') or '0')
  for i = 1, n do
    local k, a = 1 + 5 * (i - 1), 3 + 4 * (i - 1)
    local rpm, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    if rpm > 0 then set_level(KEYS[k + 1], rpm, math.min(rpm, level(KEYS[k + 1], rpm) + 1)) end
    if tpm > 0 and held > 0 then set_level(KEYS[k + 2], tpm, math.min(tpm, level(KEYS[k + 2], tpm) + held)) end
    redis.call('ZREM', KEYS[k + 3], lease)
    for w = 1, 2 do
      local key = KEYS[k + 3 + w]
      if money > 0 and tonumber(ARGV[a + 2 + w]) > 0 and redis.call('EXISTS', key) == 1 then
        redis.call('DECRBY', key, string.format('%d', money))
      end
    end
  end
end
redis.call('DEL', rec)
redis.call('HSET', rec, 'st', 'undone')
redis.call('PEXPIRE', rec, ttl)
return 1
