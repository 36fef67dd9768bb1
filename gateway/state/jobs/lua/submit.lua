-- KEYS: job, queue. ARGV: tenant, key id, request, request hash, now (ms), max queued, TTL (ms).
-- Returns 1 queued, 0 exists (same request), -1 exists with another request, -2 queue full.
local st = redis.call('HGET', KEYS[1], 'st')
if st then
  if redis.call('HGET', KEYS[1], 'rh') ~= ARGV[4] then return -1 end
  return 0
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[6]) then return -2 end
local id = redis.call('XADD', KEYS[2], '*', 'job', KEYS[1])
redis.call('HSET', KEYS[1], 'st', 'queued', 'tenant', ARGV[1], 'key', ARGV[2], 'req', ARGV[3], 'rh', ARGV[4],
  'created', ARGV[5], 'att', 0, 'entry', id)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
