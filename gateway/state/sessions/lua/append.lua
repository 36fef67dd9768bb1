-- KEYS: turns list, meta hash. ARGV: drop turns numbered below this, the new turn (JSON), system messages
-- (JSON; '' = unchanged), TTL (ms), max turns, the number the new turn must get (-1 = any).
-- Returns the number of the oldest turn kept, or -1 (nothing written) when the new turn's number is not it.
local first = tonumber(redis.call('HGET', KEYS[2], 'first') or '0')
local number = tonumber(ARGV[6])
if number >= 0 and first + redis.call('LLEN', KEYS[1]) ~= number then return -1 end
local drop = tonumber(ARGV[1]) - first
if drop > 0 then
  redis.call('LTRIM', KEYS[1], drop, -1)
  first = first + drop
end
local len = redis.call('RPUSH', KEYS[1], ARGV[2])
local max = tonumber(ARGV[5])
if len > max then
  redis.call('LTRIM', KEYS[1], len - max, -1)
  first = first + len - max
end
redis.call('HSET', KEYS[2], 'first', first)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'sys', ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return first
