"""A stand-in for one vLLM pod, for kvgate's gateway tests.

Speaks the parts of vLLM's OpenAI-compatible HTTP API that a gateway sees
(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, any other
/v1/* echoed), streams SSE token by token at a chosen pace, and records what it
received so a test can check it. Test control lives under /_test/:

  GET  /_test/requests   every request received: method, path, headers, body
                         length and sha256, and how it ended (completed,
                         client_closed)
  GET  /_test/idle_closed  {"closed": N}: keep-alive connections this pod closed for
                         sitting idle longer than --idle-timeout-ms
  POST /_test/health     {"ok": bool}: what /health answers from now on
  POST /_test/die        exits at once, as a crashed pod would
  POST /_test/publish    {"events": [...], "rank": r}: publishes one KVEventBatch of
                         these events on data-parallel rank r's ZeroMQ PUB (--zmq-bind-ranks),
                         msgpack-encoded as vLLM does ([ts, events, dp_rank]; each event an
                         array [tag, fields...]); topic kv@<--topic-host>@<model>, sequence
                         numbers per rank

Per-request behaviour is chosen by request headers (kvgate forwards them):
  x-fake-tokens: N        tokens to generate (default 4)
  x-fake-delay-ms: D      pause before each token when streaming (default 0)
  x-fake-cached-tokens: C usage.prompt_tokens_details.cached_tokens (default 0)
  x-fake-status: S        answer with this HTTP status and an OpenAI error body
  x-fake-hangup: 1        read the whole request, then close the connection without
                          answering, as a pod that crashes on a prompt does
  x-fake-prefill-status: S   as x-fake-status, for prefill legs only (see below)
  x-fake-prefill-delay-ms: D pause before answering a prefill leg

Prefill/decode disaggregation, as vLLM's NixlConnector speaks it: a request whose
`kv_transfer_params.do_remote_decode` is true is a prefill leg; its answer carries the
`kv_transfer_params` a decode pod needs to pull the KV (`do_remote_prefill`, this
pod's engine id, block ids, host and port). The parsed JSON body of every completion
request is recorded (`json`), so tests can check both legs.

With --zmq-bind-ranks N the pod binds one XPUB per data-parallel rank on consecutive
ports (rank r on the first port + r, as vLLM does), found by binding and binding anew on a
collision, never by probing a port and releasing it; kvgate connects to them. A publish
first waits for its rank's subscription, so that no batch is lost to a subscriber that
has connected but not yet subscribed.

With --reuse-port the HTTP socket binds with SO_REUSEPORT, so the pod can listen on a port
a test holds bound but not listening (connections refused until the pod starts).

Prints "READY <port>" on stdout once listening ("READY <port> <rank 0 endpoint>" with
--zmq-bind-ranks).
"""

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECORDS = []
RECORDS_LOCK = threading.Lock()
STATE = {"healthy": True, "running": 0, "idle_closed": 0}
STATE_LOCK = threading.Lock()
PUBLISHER = {}


def record(entry):
    with RECORDS_LOCK:
        RECORDS.append(entry)
        return len(RECORDS) - 1


def update(index, **fields):
    with RECORDS_LOCK:
        RECORDS[index].update(fields)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-vllm"

    def log_message(self, fmt, *args):
        sys.stderr.write("fake_vllm %d: %s\n" % (self.server.server_port, fmt % args))

    def log_error(self, fmt, *args):
        # http.server reports a connection whose next request line did not come within
        # `timeout` (the idle keep-alive limit) this way, then closes it.
        if fmt.startswith("Request timed out"):
            with STATE_LOCK:
                STATE["idle_closed"] += 1
        super().log_error(fmt, *args)

    # -- plumbing ---------------------------------------------------------------------
    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status, obj, extra_headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def begin(self):
        body = self.read_body()
        entry = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "completed": False,
            "client_closed": False,
        }
        return body, record(entry)

    # -- routes -----------------------------------------------------------------------
    def do_GET(self):
        if self.path == "/health":
            ok = STATE["healthy"]
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/metrics":
            with STATE_LOCK:
                running = STATE["running"]
            text = (
                "# TYPE vllm:num_requests_running gauge\n"
                'vllm:num_requests_running{model_name="%s"} %d.0\n'
                'vllm:num_requests_waiting{model_name="%s"} 0.0\n'
                'vllm:kv_cache_usage_perc{model_name="%s"} 0.1\n'
            ) % (self.server.model, running, self.server.model, self.server.model)
            data = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/_test/idle_closed":
            with STATE_LOCK:
                closed = STATE["idle_closed"]
            self.send_json(200, {"closed": closed})
        elif self.path == "/_test/requests":
            with RECORDS_LOCK:
                snapshot = list(RECORDS)
            self.send_json(200, snapshot)
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        else:
            _, index = self.begin()
            self.send_json(200, {"echo": True, "method": "GET", "path": self.path})
            update(index, completed=True)

    def do_POST(self):
        if self.path.startswith("/_test/"):
            body = self.read_body()
            return self.control(json.loads(body or b"{}"))
        body, index = self.begin()
        if self.path in ("/v1/chat/completions", "/v1/completions"):
            return self.completion(body, index)
        self.send_json(200, {"echo": True, "method": "POST", "path": self.path, "body_len": len(body)})
        update(index, completed=True)

    def control(self, command):
        if self.path == "/_test/health":
            STATE["healthy"] = bool(command.get("ok", True))
            self.send_json(200, {"healthy": STATE["healthy"]})
        elif self.path == "/_test/die":
            self.send_json(200, {"dying": True})
            self.wfile.flush()
            os._exit(0)
        elif self.path == "/_test/publish":
            published = publish(command["events"], int(command.get("rank", 0)))
            self.send_json(200, {"published": published})
        else:
            self.send_json(404, {"error": "unknown control path"})

    def completion(self, body, index):
        try:
            request = json.loads(body)
        except ValueError:
            self.send_json(400, {"error": {"message": "bad json", "type": "BadRequestError", "code": 400}})
            return update(index, completed=True)
        update(index, json=request)
        if self.headers.get("x-fake-hangup"):
            self.close_connection = True
            return
        prefill_leg = bool((request.get("kv_transfer_params") or {}).get("do_remote_decode"))
        status = int(self.headers.get("x-fake-status") or 200)
        if prefill_leg:
            time.sleep(int(self.headers.get("x-fake-prefill-delay-ms") or 0) / 1000.0)
            status = int(self.headers.get("x-fake-prefill-status") or status)
        if status != 200:
            self.send_json(status, {"error": {"message": "fake failure", "type": "InternalServerError", "code": status}})
            return update(index, completed=True)
        tokens = int(self.headers.get("x-fake-tokens") or 4)
        delay = int(self.headers.get("x-fake-delay-ms") or 0) / 1000.0
        cached = int(self.headers.get("x-fake-cached-tokens") or 0)
        chat = self.path == "/v1/chat/completions"
        prompt_tokens = max(1, len(body) // 4)
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + tokens,
            "completion_tokens": tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        rid = self.headers.get("x-request-id", "none")
        model = request.get("model", self.server.model)
        transfer = None
        if prefill_leg:
            port = self.server.server_port
            transfer = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": "fake-engine-%d" % port,
                "remote_block_ids": list(range((prompt_tokens + 15) // 16)),
                "remote_host": "127.0.0.1",
                "remote_port": port,
                "tp_size": 1,
            }
        with STATE_LOCK:
            STATE["running"] += 1
        try:
            if request.get("stream"):
                include_usage = (request.get("stream_options") or {}).get("include_usage", False)
                self.stream(rid, model, chat, tokens, delay, usage if include_usage else None, index)
            else:
                text = " ".join("tok%d" % i for i in range(tokens))
                choice = {"index": 0, "finish_reason": "length", "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                answer = {
                    "id": "cmpl-" + rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                    "kv_transfer_params": transfer,
                }
                try:
                    self.send_json(200, answer)
                    update(index, completed=True)
                except (BrokenPipeError, ConnectionResetError):
                    update(index, client_closed=True)
                    self.close_connection = True
        finally:
            with STATE_LOCK:
                STATE["running"] -= 1

    def stream(self, rid, model, chat, tokens, delay, usage, index):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {
            "id": "cmpl-" + rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        def event(payload):
            data = b"data: " + payload + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        try:
            for i in range(tokens):
                if delay:
                    time.sleep(delay)
                piece = "tok%d " % i
                if chat:
                    choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": piece, "finish_reason": None}
                event(json.dumps(dict(base, choices=[choice])).encode())
            if usage is not None:
                event(json.dumps(dict(base, choices=[], usage=usage)).encode())
            event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            update(index, completed=True)
        except (BrokenPipeError, ConnectionResetError):
            update(index, client_closed=True)
            self.close_connection = True


def publish(events, rank):
    """Publishes one batch on `rank`; ints stay ints (uint64 hashes are msgpack uint64)."""
    import msgpack

    socket = PUBLISHER["sockets"][rank]
    deadline = time.monotonic() + 30
    while not PUBLISHER["subscribed"][rank]:
        if time.monotonic() > deadline:
            raise RuntimeError("no subscriber on rank %d" % rank)
        if socket.poll(100) and socket.recv()[:1] == b"\x01":
            PUBLISHER["subscribed"][rank] = True
    seq = PUBLISHER["seqs"][rank]
    PUBLISHER["seqs"][rank] = seq + 1
    payload = msgpack.packb([time.time(), events, rank], use_bin_type=True)
    socket.send_multipart([PUBLISHER["topic"], seq.to_bytes(8, "big"), payload])
    return seq


def bind_ranks(ctx, ranks):
    """One XPUB per rank on consecutive loopback ports; a collision binds anew."""
    import zmq

    for _ in range(100):
        sockets = []
        try:
            first = ctx.socket(zmq.XPUB)
            sockets.append(first)
            first.bind("tcp://127.0.0.1:*")
            endpoint = first.getsockopt(zmq.LAST_ENDPOINT).decode()
            base = int(endpoint.rsplit(":", 1)[1])
            for rank in range(1, ranks):
                socket = ctx.socket(zmq.XPUB)
                sockets.append(socket)
                socket.bind("tcp://127.0.0.1:%d" % (base + rank))
            return sockets, endpoint
        except zmq.ZMQError:
            for socket in sockets:
                socket.close(linger=0)
    raise SystemExit("fake_vllm: no consecutive ports for %d ranks" % ranks)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="qwen")
    parser.add_argument("--idle-timeout-ms", type=int, help="close keep-alive connections idle this long (uvicorn: 5000)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT: listen on a port the test holds bound (not listening)")
    parser.add_argument("--zmq-bind-ranks", type=int, default=0,
                        help="bind one XPUB per data-parallel rank (kvgate connects)")
    parser.add_argument("--topic-host", default="127.0.0.1", help="the <ip> of the topic kv@<ip>@<model>")
    args = parser.parse_args()
    if args.idle_timeout_ms:
        Handler.timeout = args.idle_timeout_ms / 1000.0
    server_class = ThreadingHTTPServer
    if args.reuse_port:
        server_class = type("ReusePortServer", (ThreadingHTTPServer,), {"allow_reuse_port": True})
    server = server_class(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.model = args.model
    banner = "READY %d" % server.server_port
    if args.zmq_bind_ranks:
        import zmq

        sockets, endpoint = bind_ranks(zmq.Context.instance(), args.zmq_bind_ranks)
        PUBLISHER.update(sockets=sockets, seqs=[0] * len(sockets), subscribed=[False] * len(sockets),
                         topic=("kv@%s@%s" % (args.topic_host, args.model)).encode())
        banner += " " + endpoint
    print(banner, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
