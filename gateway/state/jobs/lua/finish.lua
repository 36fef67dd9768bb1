-- KEYS: job, events, queue. ARGV: token, state, result JSON, error code, error message, now (ms), result TTL
-- (ms), entry id, events max length. Returns 1 recorded, 0 refused (not the current run: stale).
if redis.call('HGET', KEYS[1], 'st') ~= 'running' or redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'st', ARGV[2], 'res', ARGV[3], 'ecode', ARGV[4], 'emsg', ARGV[5], 'finished', ARGV[6],
  'tok', '')
redis.call('HDEL', KEYS[1], 'req')
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 't', 'f')
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('XACK', KEYS[3], 'igw', ARGV[8])
redis.call('XDEL', KEYS[3], ARGV[8])
return 1
