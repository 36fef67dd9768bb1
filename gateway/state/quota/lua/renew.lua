-- Keep an open reservation alive: its record and its leases get a fresh TTL. One that is no longer
-- open (settled, undone or expired) is not brought back: returns 0.
-- KEYS: the reservation's record, then the lease set of each budget. ARGV: lease id, lease TTL (ms).
local lease, ttl = ARGV[1], tonumber(ARGV[2])
if redis.call('HGET', KEYS[1], 'st') ~= 'open' then return 0 end
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 2, #KEYS do
  if redis.call('ZSCORE', KEYS[i], lease) then
    redis.call('ZADD', KEYS[i], now + ttl, lease)
    extend(KEYS[i], ttl + 1000)
  end
end
return 1
