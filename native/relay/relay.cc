// The native relay (gateway.native_relay): this process carries the messages of gateway.v1 Execute
// calls, the gateway's Python core keeps every decision.
//
//   clients --Execute--> relay --Session--> worker
//                          |
//                  control link (a Unix socket, batched)
//                          |
//                     Python core: auth, validation, quotas, queue, placement, cache, sessions,
//                     metrics, logs; it submits on the worker through the relay
//
// Per client call the relay sends the core the raw request once and gets back its replies (Started,
// Done, or an error status). Per token the relay alone works: a worker delta is written to its client
// call here; the core sees a request's first delta (for its timings) and the rest merged into one,
// just before the request's end (for usage, the cache and sessions).
//
// The gateway process starts this one and owns it:
//
//   native_relay --listen HOST:PORT --core-socket PATH
//
// The core names the workers (Connect); the relay holds a Session stream to each, and reports one
// that ends (SessionLost) after handing the core what its requests had streamed. A client slower than
// its tokens costs one pending delta, merged (as the Python path merges), never a queue per token. When
// the core's link breaks (the gateway exited or was killed), every call still open ends UNAVAILABLE and
// the relay exits: its gateway starts a new one, Envoy moves new calls to another replica meanwhile.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/client_callback.h>

#include <csignal>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "gateway/native_relay/v0/control.pb.h"
#include "gateway/v1/gateway.pb.h"
#include "igw_worker_api/v1/worker.grpc.pb.h"

namespace ctl = native_relay::v0;
namespace wpb = inference::v1;
namespace gpb = gateway::v1;

static const char kExecute[] = "/gateway.v1.Gateway/Execute";

static grpc::ByteBuffer Buffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// This process's resident memory (/proc/self/statm's second field, in pages); 0 if unreadable.
static uint64_t ResidentBytes() {
  unsigned long long size = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  int got = std::fscanf(f, "%llu %llu", &size, &resident);
  std::fclose(f);
  return got == 2 ? resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE)) : 0;
}

static bool Printable(const std::string& s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

class Relay;

// One client's Execute call.
class Call : public grpc::ServerGenericBidiReactor {
 public:
  Call(Relay* relay, grpc::GenericCallbackServerContext* ctx, uint64_t id) : relay_(relay), ctx_(ctx), id_(id) {
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // All below: with the relay's lock held.
  void Write(grpc::ByteBuffer buf);        // the core's reply
  void AddDelta(const wpb::TokenDelta& d);  // the worker's
  void End(const grpc::Status& status);

 private:
  friend class Relay;
  void Pump();
  void TakePending();

  Relay* relay_;
  grpc::GenericCallbackServerContext* ctx_;
  uint64_t id_;
  grpc::ByteBuffer request_;
  std::deque<grpc::ByteBuffer> out_;  // the core's replies: a few per call
  // The worker's deltas not yet written (before the core's Started, or behind a write in flight), merged
  // into one: a slow client costs one string, bounded by its request's max_tokens.
  gpb::ExecuteResponse pending_;
  bool has_pending_ = false;
  std::vector<std::string> wires_;  // the requests bound to this call (a resumed one has several)
  bool started_ = false;
  bool writing_ = false;
  bool ending_ = false;
  bool finished_ = false;
  grpc::Status status_;
};

// One worker's Session stream. It ends for good when the stream does; the core reconnects.
class Upstream : public grpc::ClientBidiReactor<wpb::GatewayMessage, wpb::WorkerFrame> {
 public:
  Upstream(Relay* relay, const std::string& worker);
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone(const grpc::Status& s) override;
  void Send(const wpb::GatewayMessage& msg);  // with the relay's lock held
  void Stop() { ctx_.TryCancel(); }

 private:
  void Pump();
  Relay* relay_;
  std::string worker_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<wpb::Worker::Stub> stub_;
  grpc::ClientContext ctx_;
  wpb::WorkerFrame frame_;
  wpb::GatewayMessage writing_msg_, next_;
  bool writing_ = false, has_next_ = false;
};

// The link to the Python core: a Unix socket, each message a 4-byte little-endian length and the
// message (no gRPC call on the core's side, only asyncio's stream reader and writer). What the relay
// sends is gathered in next() and handed to the writer thread by Flush(), both with the relay's lock
// held; what comes back goes to Relay::FromCore.
class CoreLink {
 public:
  CoreLink(Relay* relay, const std::string& path);  // connects
  void Start();  // the reader and writer threads
  ctl::RelayUp& next() { has_next_ = true; return next_; }
  void Flush() {
    if (has_next_) cv_.notify_one();
  }

 private:
  void ReadLoop();
  void WriteLoop();
  Relay* relay_;
  int fd_ = -1;
  ctl::RelayUp next_;
  bool has_next_ = false;
  std::condition_variable_any cv_;
};

// What the relay keeps of a request the core submitted for a client call.
struct Bound {
  uint64_t call_id = 0;
  std::string worker;            // as the core named it
  Upstream* upstream = nullptr;  // the session the request was sent on
  bool first_sent = false;  // the first delta went to the core as is
  wpb::TokenDelta merged;   // the deltas after it, merged, for the core's next report or the end
  std::chrono::steady_clock::time_point reported;  // when the core last heard of its deltas
};

class Relay : public grpc::CallbackGenericService {
 public:
  std::recursive_mutex mu;  // recursive: gRPC may run a reaction inline, under a Start* we called
  std::unordered_map<uint64_t, Call*> calls;
  std::unordered_map<std::string, Bound> bound;
  std::unordered_map<std::string, Upstream*> upstreams;  // each deletes itself when its stream ends
  std::unique_ptr<CoreLink> control;
  grpc::Server* server = nullptr;
  // How often the core hears of a long stream's tokens (the tokens a cancelled or superseded request
  // is charged for are those the core has heard of).
  std::chrono::milliseconds report_interval{100};
  // A core that leaves a ping unanswered this long is taken for gone (frozen, stopped): the calls
  // would hang on it otherwise.
  std::chrono::milliseconds core_timeout{3000};
  uint64_t ping_sent = 0;  // the ping awaiting its pong (0: none)
  std::chrono::steady_clock::time_point ping_at;

  // The core's liveness: a ping at a quarter of the timeout, answered or the core is gone. Each ping
  // carries what the relay holds (RelayStats), for the gateway's metrics.
  void Watch() {
    auto step = std::max(std::chrono::milliseconds(20), core_timeout / 4);
    for (uint64_t seq = 1;; ++seq) {
      std::this_thread::sleep_for(step);
      bool gone;
      {
        std::lock_guard<std::recursive_mutex> lock(mu);
        auto now = std::chrono::steady_clock::now();
        gone = ping_sent && now - ping_at > core_timeout;
        if (!ping_sent) {
          ping_sent = seq;
          ping_at = now;
          auto& up = control->next();
          up.set_ping(seq);
          auto* stats = up.mutable_stats();
          stats->set_calls(static_cast<uint32_t>(calls.size()));
          stats->set_bound_requests(static_cast<uint32_t>(bound.size()));
          stats->set_worker_streams(static_cast<uint32_t>(upstreams.size()));
          stats->set_resident_bytes(ResidentBytes());
          control->Flush();
        }
      }
      if (gone) CoreGone("it left a ping unanswered");
    }
  }
  uint64_t next_id = 1;

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    if (ctx->method() != kExecute) {
      class Unimplemented : public grpc::ServerGenericBidiReactor {
       public:
        Unimplemented() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "the native relay serves Execute only")); }
        void OnDone() override { delete this; }
      };
      return new Unimplemented();
    }
    std::lock_guard<std::recursive_mutex> lock(mu);
    auto* call = new Call(this, ctx, next_id++);
    calls[call->id_] = call;
    return call;
  }

  // A client call's request arrived: hand it to the core.
  void Opened(Call* call) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    auto* opened = control->next().add_opened();
    opened->set_call_id(call->id_);
    grpc::Slice slice;
    if (call->request_.DumpToSingleSlice(&slice).ok()) {
      opened->set_request(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
    for (const auto& [k, v] : call->ctx_->client_metadata()) {
      std::string key(k.data(), k.size()), value(v.data(), v.size());
      // Only printable ASCII reaches the core as a proto string (binary "-bin" values are not text).
      if (!Printable(key) || !Printable(value)) continue;
      (*opened->mutable_metadata())[key] = value;
    }
    auto deadline = call->ctx_->deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::system_clock::now());
      opened->set_timeout_ms(std::max<int64_t>(1, left.count()));
    }
    control->Flush();
  }

  void Closed(uint64_t id) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    control->next().add_closed()->set_call_id(id);
    control->Flush();
  }

  // The call is done. A request bound to it but never submitted (the core cancelled it while its submit
  // still waited) ends nowhere: forgotten here. A submitted one ends on its worker, or with its session.
  void Forget(Call* call) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    for (const auto& wire : call->wires_) {
      auto b = bound.find(wire);
      if (b != bound.end() && b->second.upstream == nullptr) bound.erase(b);
    }
    calls.erase(call->id_);
  }

  // The core's message: binds, then the worker's part, then replies to clients.
  void FromCore(const ctl::RelayDown& down) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (down.pong() && down.pong() == ping_sent) ping_sent = 0;
    for (const auto& c : down.connects()) {
      auto it = upstreams.find(c.worker());
      if (it != upstreams.end()) it->second->Stop();  // its OnDone reports it lost, as any end
      upstreams[c.worker()] = new Upstream(this, c.worker());
      // A new session: what was bound for the worker's old one (submits the core dropped when it
      // learnt that session was lost) will never end there.
      for (auto b = bound.begin(); b != bound.end();) {
        b = b->second.worker == c.worker() ? bound.erase(b) : std::next(b);
      }
    }
    for (const auto& b : down.binds()) {
      auto call = calls.find(b.call_id());
      if (call == calls.end()) continue;  // the client is gone: the request's events go to the core as is
      call->second->wires_.push_back(b.wire_id());
      Bound& entry = bound[b.wire_id()];
      entry.call_id = b.call_id();
      entry.worker = b.worker();
    }
    for (const auto& w : down.workers()) {
      auto it = upstreams.find(w.worker());
      if (it == upstreams.end()) {  // lost already: the core hears it (SessionLost) and fails these
        for (const auto& sub : w.message().submits()) bound.erase(sub.request_id());
        continue;
      }
      for (const auto& sub : w.message().submits()) {
        auto b = bound.find(sub.request_id());
        if (b != bound.end()) b->second.upstream = it->second;
      }
      it->second->Send(w.message());
    }
    for (const auto& r : down.replies()) {
      auto it = calls.find(r.call_id());
      if (it == calls.end()) continue;  // the client is gone
      Call* call = it->second;
      if (!r.response().empty()) call->Write(Buffer(r.response()));
      if (r.end()) {
        for (const auto& t : r.trailers()) {
          if (Printable(t.key()) && Printable(t.value())) call->ctx_->AddTrailingMetadata(t.key(), t.value());
        }
        call->End(grpc::Status(static_cast<grpc::StatusCode>(r.status_code()), r.status_message(),
                               r.status_details()));
      }
    }
  }

  // The worker's frame: deltas to their clients; the rest (and the deltas, reduced) to the core.
  void FromWorker(const std::string& worker, const wpb::WorkerFrame& frame) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    auto* from = control->next().add_frames();
    from->set_worker(worker);
    wpb::WorkerFrame* reduced = from->mutable_frame();
    if (frame.has_kv_cache()) reduced->mutable_kv_cache()->MergeFrom(frame.kv_cache());
    for (const auto& ev : frame.events()) {
      auto it = bound.find(ev.request_id());
      if (it == bound.end()) {  // not ours to write (e.g. cancelled): the core accounts for it
        *reduced->add_events() = ev;
        continue;
      }
      Bound& b = it->second;
      if (ev.has_delta()) {
        const auto& d = ev.delta();
        auto c = calls.find(b.call_id);
        if (c != calls.end()) c->second->AddDelta(d);
        auto now = std::chrono::steady_clock::now();
        if (!b.first_sent) {
          b.first_sent = true;
          b.reported = now;
          *reduced->add_events() = ev;
        } else {
          b.merged.mutable_text()->append(d.text());
          b.merged.set_tokens(b.merged.tokens() + d.tokens());
          b.merged.mutable_token_ids()->MergeFrom(d.token_ids());
          b.merged.mutable_tool_calls()->MergeFrom(d.tool_calls());
          if (now - b.reported >= report_interval) {
            FlushMerged(ev.request_id(), b, reduced);
            b.reported = now;
          }
        }
        continue;
      }
      if (ev.has_accepted()) {
        *reduced->add_events() = ev;
        continue;
      }
      FlushMerged(ev.request_id(), b, reduced);  // the request ends: its merged deltas first
      *reduced->add_events() = ev;
      bound.erase(it);
    }
    if (reduced->events_size() == 0 && !reduced->has_kv_cache()) {
      control->next().mutable_frames()->RemoveLast();
    }
    control->Flush();
  }

  // A worker's session ended: what its requests had streamed reaches the core before the news, so
  // the core can resume them elsewhere from every token their clients got.
  void Lost(Upstream* up, const std::string& worker, const std::string& error) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    auto* from = control->next().add_frames();
    from->set_worker(worker);
    for (auto it = bound.begin(); it != bound.end();) {
      if (it->second.upstream == up) {
        FlushMerged(it->first, it->second, from->mutable_frame());
        it = bound.erase(it);
      } else {
        ++it;
      }
    }
    if (from->frame().events_size() == 0) control->next().mutable_frames()->RemoveLast();
    auto found = upstreams.find(worker);
    if (found != upstreams.end() && found->second == up) {
      upstreams.erase(found);
      auto* lost = control->next().add_lost();
      lost->set_worker(worker);
      lost->set_error(error);
    }
    control->Flush();
  }

  // The core's link broke: without it no call can go on. Each open call ends UNAVAILABLE (Envoy retries
  // one that had not started on another replica), the workers' streams end (so they abort what they
  // generate for these calls), and the process exits; the gateway, if alive, starts a new relay.
  void CoreGone(const char* why) {
    static std::once_flag once;
    std::call_once(once, [&] {
      std::fprintf(stderr, "native relay: the core's link is gone (%s): ending %zu calls\n", why, calls.size());
      {
        std::lock_guard<std::recursive_mutex> lock(mu);
        for (auto& [id, call] : calls) {
          call->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the gateway process serving this call is gone; retry"));
        }
        for (auto& [worker, up] : upstreams) up->Stop();
      }
      if (server) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
      std::_Exit(4);
    });
  }

  static void FlushMerged(const std::string& wire_id, Bound& b, wpb::WorkerFrame* into) {
    if (b.merged.tokens() || !b.merged.text().empty() || b.merged.tool_calls_size()) {
      auto* merged = into->add_events();
      merged->set_request_id(wire_id);
      *merged->mutable_delta() = std::move(b.merged);
      b.merged.Clear();
    }
  }
};

// --- Call ------------------------------------------------------------------------------------------

void Call::OnReadDone(bool ok) {
  if (!ok) {
    std::lock_guard<std::recursive_mutex> lock(relay_->mu);
    End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
    return;
  }
  relay_->Opened(this);
}

void Call::Write(grpc::ByteBuffer buf) {
  if (ending_) return;
  if (started_) TakePending();  // the deltas came first
  out_.push_back(std::move(buf));
  started_ = true;  // the core's first reply (Started): the deltas held for it follow
  Pump();
}

void Call::AddDelta(const wpb::TokenDelta& d) {
  if (ending_) return;
  auto* delta = pending_.mutable_delta();
  delta->mutable_text()->append(d.text());
  delta->set_tokens(delta->tokens() + d.tokens());
  for (const auto& t : d.tool_calls()) {  // the same fields on both protocols
    int n = delta->tool_calls_size();
    if (n && delta->tool_calls(n - 1).index() == t.index() && t.id().empty() && t.name().empty()) {
      // The same call's arguments go on (gateway.workers.streaming.merge_pieces, the same rule).
      delta->mutable_tool_calls(n - 1)->mutable_arguments()->append(t.arguments());
      continue;
    }
    auto* out = delta->add_tool_calls();
    out->set_index(t.index());
    out->set_id(t.id());
    out->set_name(t.name());
    out->set_arguments(t.arguments());
  }
  has_pending_ = true;
  Pump();
}

void Call::TakePending() {
  if (!has_pending_) return;
  out_.push_back(Buffer(pending_.SerializeAsString()));
  pending_.Clear();
  has_pending_ = false;
}

void Call::End(const grpc::Status& status) {
  if (ending_) return;
  ending_ = true;
  status_ = status;
  Pump();
}

void Call::Pump() {
  if (writing_ || finished_) return;
  if (out_.empty() && started_) TakePending();
  if (!out_.empty()) {
    writing_ = true;
    StartWrite(&out_.front());
    return;
  }
  if (ending_) {
    finished_ = true;
    Finish(status_);
  }
}

void Call::OnWriteDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(relay_->mu);
  writing_ = false;
  out_.pop_front();
  if (!ok) {  // the client is gone; OnCancel tells the core
    out_.clear();
    if (!finished_) {
      finished_ = true;
      Finish(grpc::Status::CANCELLED);
    }
    return;
  }
  Pump();
}

void Call::OnCancel() {
  std::lock_guard<std::recursive_mutex> lock(relay_->mu);
  if (ending_) return;
  relay_->Closed(id_);
  // A cancelled call is still ours to finish: gRPC calls OnDone (which frees it) only after Finish.
  // Nothing more is written; a write in flight keeps its buffer until OnWriteDone.
  out_.erase(writing_ ? out_.begin() + 1 : out_.begin(), out_.end());
  has_pending_ = false;
  End(grpc::Status::CANCELLED);
}

void Call::OnDone() {
  relay_->Forget(this);
  delete this;
}

// --- Upstream --------------------------------------------------------------------------------------

Upstream::Upstream(Relay* relay, const std::string& worker) : relay_(relay), worker_(worker) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 * 1024 * 1024);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);  // a silently dead worker is noticed
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  channel_ = grpc::CreateCustomChannel(worker, grpc::InsecureChannelCredentials(), args);
  stub_ = wpb::Worker::NewStub(channel_);
  stub_->async()->Session(&ctx_, this);
  StartRead(&frame_);
  StartCall();
}

void Upstream::OnDone(const grpc::Status& s) {
  relay_->Lost(this, worker_, s.error_message());
  delete this;
}

void Upstream::Send(const wpb::GatewayMessage& msg) {
  next_.MergeFrom(msg);  // batched behind a write in flight
  has_next_ = true;
  Pump();
}

void Upstream::Pump() {
  if (writing_ || !has_next_) return;
  writing_msg_.Swap(&next_);
  next_.Clear();
  has_next_ = false;
  writing_ = true;
  StartWrite(&writing_msg_);
}

void Upstream::OnWriteDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(relay_->mu);
  writing_ = false;
  if (ok) Pump();
}


void Upstream::OnReadDone(bool ok) {
  if (!ok) return;  // OnDone follows
  relay_->FromWorker(worker_, frame_);
  frame_.Clear();
  StartRead(&frame_);
}

// --- CoreLink --------------------------------------------------------------------------------------

CoreLink::CoreLink(Relay* relay, const std::string& path) : relay_(relay) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
  for (int i = 0;; ++i) {
    fd_ = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) break;
    close(fd_);
    if (i > 600) {
      std::fprintf(stderr, "native relay: cannot connect to the core at %s\n", path.c_str());
      std::_Exit(5);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

void CoreLink::Start() {
  std::thread([this] { ReadLoop(); }).detach();
  std::thread([this] { WriteLoop(); }).detach();
}

static bool ReadFull(int fd, char* buf, size_t n) {
  while (n) {
    ssize_t got = read(fd, buf, n);
    if (got <= 0) return false;
    buf += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

void CoreLink::ReadLoop() {
  std::string buf;
  ctl::RelayDown down;
  for (;;) {
    uint32_t len;
    if (!ReadFull(fd_, reinterpret_cast<char*>(&len), 4)) break;
    buf.resize(len);
    if (!ReadFull(fd_, buf.data(), len) || !down.ParseFromString(buf)) break;
    relay_->FromCore(down);
    down.Clear();
  }
  relay_->CoreGone("the socket closed");
}

void CoreLink::WriteLoop() {
  std::string out;
  ctl::RelayUp msg;
  for (;;) {
    {
      std::unique_lock<std::recursive_mutex> lock(relay_->mu);
      cv_.wait(lock, [this] { return has_next_; });
      msg.Swap(&next_);
      next_.Clear();
      has_next_ = false;
    }
    uint32_t len = static_cast<uint32_t>(msg.ByteSizeLong());
    out.assign(reinterpret_cast<const char*>(&len), 4);
    msg.AppendToString(&out);
    msg.Clear();
    const char* p = out.data();
    size_t n = out.size();
    while (n) {
      ssize_t put = write(fd_, p, n);
      if (put <= 0) relay_->CoreGone("a write failed");
      p += put;
      n -= static_cast<size_t>(put);
    }
  }
}

// --- main ------------------------------------------------------------------------------------------

int main(int argc, char** argv) {
  std::string listen, core_socket;
  long max_request_bytes = 4 * 1024 * 1024, report_interval_ms = 100, min_ping_interval_ms = 10000,
       core_timeout_ms = 3000;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--listen") listen = argv[i + 1];
    else if (k == "--core-socket") core_socket = argv[i + 1];
    else if (k == "--max-request-bytes") max_request_bytes = std::atol(argv[i + 1]);
    else if (k == "--report-interval-ms") report_interval_ms = std::atol(argv[i + 1]);
    else if (k == "--min-ping-interval-ms") min_ping_interval_ms = std::atol(argv[i + 1]);
    else if (k == "--core-timeout-ms") core_timeout_ms = std::atol(argv[i + 1]);
  }
  if (listen.empty() || core_socket.empty() || max_request_bytes <= 0 || report_interval_ms <= 0 ||
      min_ping_interval_ms < 0 || core_timeout_ms <= 0) {
    std::fprintf(stderr,
                 "usage: native_relay --listen HOST:PORT --core-socket PATH [--max-request-bytes N]"
                 " [--report-interval-ms N] [--min-ping-interval-ms N] [--core-timeout-ms N]\n");
    return 2;
  }
  // Its life is its core link's: a signal to the gateway's process group (Ctrl-C, a drain's SIGTERM)
  // is the gateway's to act on; the gateway closes the link when its streams are done, and the relay
  // follows. A write to a closed link is an error to handle, not a signal.
  std::signal(SIGINT, SIG_IGN);
  std::signal(SIGTERM, SIG_IGN);
  std::signal(SIGPIPE, SIG_IGN);

  Relay relay;
  relay.report_interval = std::chrono::milliseconds(report_interval_ms);
  relay.core_timeout = std::chrono::milliseconds(core_timeout_ms);
  relay.control = std::make_unique<CoreLink>(&relay, core_socket);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials());
  builder.RegisterCallbackGenericService(&relay);
  // The gateway's request size budget (gateway.limits.max_request_bytes): larger calls get
  // RESOURCE_EXHAUSTED from gRPC before any work, as on the gateway's own server.
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<long>(max_request_bytes, 1L << 30)));
  // Envoy and clients keep idle connections alive with pings, as on the gateway's server
  // (gateway.min_ping_interval_ms); a peer is never sent GOAWAY for pinging (too_many_pings would
  // cut every stream of Envoy's connection).
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             static_cast<int>(min_ping_interval_ms));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  auto server = builder.BuildAndStart();
  if (!server) {
    std::fprintf(stderr, "native relay: cannot listen on %s\n", listen.c_str());
    return 1;
  }
  relay.server = server.get();
  relay.control->Start();
  std::thread([&relay] { relay.Watch(); }).detach();
  std::fprintf(stderr, "native relay: listening on %s, core %s\n", listen.c_str(), core_socket.c_str());
  server->Wait();
  return 0;
}
