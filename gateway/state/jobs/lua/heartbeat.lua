-- KEYS: job, queue. ARGV: token, consumer, entry id. Resets the entry's idle time while this run is the
-- job's current one; 0 when it is not (another gateway reran it): stop.
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('XCLAIM', KEYS[2], 'igw', ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
