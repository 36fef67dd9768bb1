-- Prepended to every script of this folder when it is loaded (gateway/quota/redis_store.py).
-- Time is Redis's own clock (ms), so the gateways' clocks do not matter.
local now_ = redis.call('TIME')
local now = tonumber(now_[1]) * 1000 + math.floor(tonumber(now_[2]) / 1000)

-- A token bucket: its hash holds level 'l' as of time 't'; it refills at lim per minute up to lim.
-- A missing hash is a full bucket. The same formula as refill() in gateway/quota/local.py.
local function level(key, lim)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return lim end
  return math.min(lim, tonumber(v[1]) + (now - tonumber(v[2])) * lim / 60000)
end

-- Store a bucket's level. The hash lives until the bucket is full again, then reads as full.
local function set_level(key, lim, l)
  if l >= lim then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'l', tostring(l), 't', now)
  redis.call('PEXPIRE', key, math.ceil((lim - l) * 60000 / lim) + 1000)
end

-- Let a key live at least ms more, never shortening it (a lease set's other members may need longer).
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

-- A reservation's record (KEYS[1] of reserve, adjust, undo, renew): hash {st = 'open', tok = tokens
-- held} while open, {st = 'undone'} once undone (a tombstone); both expire with the lease TTL.
