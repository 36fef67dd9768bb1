-- Reserve one request, ARGV tokens, ARGV spend and a stream lease on every budget, all or nothing.
-- KEYS: the reservation's record, then 5 per budget: requests bucket, tokens bucket, lease set, spend of
-- the UTC day, spend of the UTC month (the caller names the windows, so refunds find them again).
-- ARGV: n budgets, tokens, lease id, lease TTL (ms), spend (micro-units), day key expire-at, month key
-- expire-at (Unix s), then 5 per budget: rpm, tpm, concurrent streams, day limit, month limit (0 = none).
-- Returns {1}: charged (or charged already by an earlier run of this call: never twice);
-- {2}: refused, this reservation was undone (its caller gave up waiting for this call);
-- {0, wait ms (-1: waiting cannot help), then kind (1 requests, 2 tokens, 3 concurrent, 4 day spend,
-- 5 month spend), budget index, level * 1000 (spend: micro-units spent) per violation}. The wait covers
-- the buckets; the caller adds the wait until a spend window ends.
local rec = KEYS[1]
local n, cost, lease, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local money, dexp, mexp = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local st = redis.call('HGET', rec, 'st')
if st == 'undone' then return {2} end
if st then return {1} end

local out, worst, levels = {0, 0}, 0, {}
for i = 1, n do
  local a, k = 7 + 5 * (i - 1), 1 + 5 * (i - 1)
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  for kind, c in ipairs({{KEYS[k + 1], rpm, 1}, {KEYS[k + 2], tpm, cost}}) do
    local key, lim, need = c[1], c[2], c[3]
    if lim > 0 then
      local l = level(key, lim)
      levels[key] = l
      if l < need then
        local wait = -1
        if need <= lim then wait = math.ceil((need - l) * 60000 / lim) end
        if wait < 0 or worst < 0 then worst = -1 elseif wait > worst then worst = wait end
        table.insert(out, kind); table.insert(out, i); table.insert(out, math.floor(l * 1000))
      end
    end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 3]) >= conc then
      if worst >= 0 and worst < 1000 then worst = 1000 end
      table.insert(out, 3); table.insert(out, i); table.insert(out, 0)
    end
  end
  for w = 1, 2 do
    local lim = tonumber(ARGV[a + 3 + w])
    if lim > 0 then
      local spent = tonumber(redis.call('GET', KEYS[k + 3 + w]) or '0')
      if spent + money > lim then
        table.insert(out, 3 + w); table.insert(out, i); table.insert(out, spent)
      end
    end
  end
end
if #out > 2 then
  out[2] = worst
  return out
end

for i = 1, n do
  local a, k = 7 + 5 * (i - 1), 1 + 5 * (i - 1)
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if rpm > 0 then set_level(KEYS[k + 1], rpm, levels[KEYS[k + 1]] - 1) end
  if tpm > 0 then set_level(KEYS[k + 2], tpm, levels[KEYS[k + 2]] - cost) end
  if conc > 0 then
    redis.call('ZADD', KEYS[k + 3], now + ttl, lease)
    extend(KEYS[k + 3], ttl + 1000)
  end
  for w = 1, 2 do
    if tonumber(ARGV[a + 3 + w]) > 0 then
      redis.call('INCRBY', KEYS[k + 3 + w], string.format('%d', money))
      redis.call('EXPIREAT', KEYS[k + 3 + w], w == 1 and dexp or mexp)
    end
  end
end
redis.call('HSET', rec, 'st', 'open', 'tok', cost, 'spend', string.format('%d', money))
redis.call('PEXPIRE', rec, ttl)
return {1}
