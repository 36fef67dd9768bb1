-- KEYS: job, events, queue. ARGV: consumer, token, now (ms), max attempts, TTL (ms), entry id, result TTL (ms),
-- events max length. Returns {0} (gone or finished: entry dropped), {-1, runs} (out of runs: failed), or
-- {1, run, tenant, key id, request}.
-- ARGV[9]: the gRPC status code a job that ran out of runs is recorded with (UNAVAILABLE).
local function drop()
  redis.call('XACK', KEYS[3], 'igw', ARGV[6])
  redis.call('XDEL', KEYS[3], ARGV[6])
end
local st = redis.call('HGET', KEYS[1], 'st')
if not st or st == 'succeeded' or st == 'failed' then drop() return {0} end
local run = redis.call('HINCRBY', KEYS[1], 'att', 1)
if run > tonumber(ARGV[4]) then
  local why = redis.call('HGET', KEYS[1], 'emsg')
  if not why or why == '' then why = 'the gateways running it stopped before it finished' end
  redis.call('HSET', KEYS[1], 'att', run - 1, 'st', 'failed', 'tok', '', 'finished', ARGV[3],
    'emsg', 'gave up after ' .. (run - 1) .. ' runs; the last: ' .. why)
  if not redis.call('HGET', KEYS[1], 'ecode') then redis.call('HSET', KEYS[1], 'ecode', ARGV[9]) end
  redis.call('HDEL', KEYS[1], 'req')
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 't', 'f')
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  drop()
  return {-1, run - 1}
end
redis.call('HSET', KEYS[1], 'st', 'running', 'tok', ARGV[2], 'owner', ARGV[1], 'started', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 't', 's', 'a', run)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {1, run, redis.call('HGET', KEYS[1], 'tenant'), redis.call('HGET', KEYS[1], 'key'),
  redis.call('HGET', KEYS[1], 'req')}
