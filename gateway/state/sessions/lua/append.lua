-- an assistant message's role markers in a chat template
-- 
-- 
-- ataclass
-- ass Turn:
--   messages: list[tuple[str, str]]  # (role, content), no system messages
--   answer: str
--   tokens: int  # measured share of the prompt, see the module docstring
-- 
--   @property
--   def size(self) -> int:
--       return sum(len(c.encode()) for _, c in self.messages) + len(self.answer.encode())
-- 
--   def encode(self) -> str:
--       return json.dumps({"m": self.messages, "a": self.answer, "k": self.tokens}, ensure_ascii=False)
-- 
--   @classmethod
--   def decode(cls, raw) -> Turn:
--       d = json.loads(raw)
--       return cls([(str(r), str(c)) for r, c in d["m"]], str(d["a"]), int(d["k"]))
-- 
-- 
-- ataclass
-- ass Stored:
--   first: int  # the number of turns[0]; turns are numbered from 0 as they are added
--   system: list[tuple[str, str]]
--   turns: list[Turn]
--   expires_in_s: float
-- 
-- 
-- ataclass
-- ass ActiveTurn:
--   """A turn being generated: what it sent, and what to write when it is done."""
-- 
--   tenant: str
--   session_id: str
--   messages: list[wpb.ChatMessage]  # what the worker sees
--   history_turns: int
--   dropped: int
--   drop_below: int  # turns numbered below this leave the session when this one is written
--   own: list[tuple[str, str]]  # this turn's messages to store
--   system: list[tuple[str, str]] | None  # new system messages, or None to keep the session's
--   history_tokens: int
--   fixed_tokens: int  # the estimate of what is sent again each turn (context, system messages)
--   answer: list[str] = field(default_factory=list)
-- 
-- 
-- f _pairs(messages) -> list[tuple[str, str]]:
--   return [(m.role, m.content) for m in messages]
-- 
-- 
-- f _chat(pairs) -> list[wpb.ChatMessage]:
--   return [wpb.ChatMessage(role=r, content=c) for r, c in pairs]
-- 
-- 
-- ass MemoryStore:
--   def __init__(self, max_sessions: int):
--       self.max_sessions = max_sessions
--       self._items: collections.OrderedDict[tuple[str, str], tuple[float, Stored]] = collections.OrderedDict()
-- 
--   async def load(self, tenant: str, sid: str) -> Stored | None:
--       item = self._items.get((tenant, sid))
--       if item is None:
--           return None
--       if item[0] <= time.monotonic():
--           del self._items[(tenant, sid)]
--           return None
--       self._items.move_to_end((tenant, sid))
--       s = item[1]
--       return Stored(s.first, list(s.system), list(s.turns), item[0] - time.monotonic())
-- 
--   async def append(self, tenant, sid, drop_below, turn, system, ttl_s, max_turns) -> None:
--       item = self._items.get((tenant, sid))
--       s = item[1] if item is not None and item[0] > time.monotonic() else Stored(0, [], [], 0)
--       drop = max(0, drop_below - s.first)
--       turns = s.turns[drop:] + [turn]
--       first = s.first + drop
--       if len(turns) > max_turns:
--           first += len(turns) - max_turns
--           turns = turns[-max_turns:]
--       self._items[(tenant, sid)] = (
--           time.monotonic() + ttl_s,
--           Stored(first, system if system is not None else s.system, turns, ttl_s),
--       )
--       self._items.move_to_end((tenant, sid))
--       while len(self._items) > self.max_sessions:
--           self._items.popitem(last=False)
-- 
--   async def delete(self, tenant: str, sid: str) -> bool:
--       item = self._items.pop((tenant, sid), None)
--       return item is not None and item[0] > time.monotonic()
-- 
--   async def close(self) -> None:
--       pass
-- 
-- 
-- KEYS: turns list, meta hash. ARGV: drop turns numbered below this, the new turn (JSON), system messages
-- (JSON; '' = unchanged), TTL (ms), max turns. Returns the number of the oldest turn kept.
local first = tonumber(redis.call('HGET', KEYS[2], 'first') or '0')
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
