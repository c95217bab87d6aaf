#!/usr/bin/env python3
"""A vLLM KV-event publisher for kvgate's ingestion tests: real ZeroMQ sockets
in another process, speaking vLLM's wire format (docs/vllm-kv-events.md §2-§5).

Modes:

  vectors   Sends the exact frames of ../shared/vectors/vllm_kv_events.json,
            one publisher per format, and serves replay with that release's
            reply frames (checked against the recorded exchange at start).
  stream    Simulates a pod: requests over shared prefixes fill an LRU prefix
            cache of fixed capacity; each engine step publishes one batch of
            BlockStored (chained sha256_cbor hashes, as vLLM 0.10.2+ computes
            them) and BlockRemoved (LRU eviction, tail blocks first), optionally
            AllBlocksCleared. The cache state at the end is printed, so a test
            can compare kvgate's index with what the pod really holds.
  selftest  Checks this script's hashing and encoding against the vectors.

Impairments of the live stream (the replay buffer always holds the truth, as
in vLLM where a batch dropped at the PUB's high-water mark stays buffered):
--drop P, --drop-seqs, --reorder P, --duplicate P; --replay-lossy N drops
every other replied batch (never the last) of the first N replay requests, as
vLLM's ROUTER before 0.33 drops replies beyond its send high-water mark, and
still sends the end marker.

The PUB is an XPUB (identical on the wire) so the script can wait for the
subscription before sending, unless --no-wait asks for vLLM's behaviour of
sending at once (the slow-joiner loss). Stdout carries one JSON object per
line: {"event": "ready", ...} once the sockets exist, {"event": "done", ...}
with the final cache state once everything is sent.
"""

import argparse
import collections
import hashlib
import json
import os
import random
import socket
import sys
import time

import msgpack
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "..", "..", "..", "shared", "vectors", "vllm_kv_events.json")
END_SEQ = b"\xff" * 8


def emit(obj):
    print(json.dumps(obj), flush=True)


def release_tuple(text):
    return tuple(int(part) for part in text.split("."))


def seq_frame(seq):
    return seq.to_bytes(8, "big")


# --- hashing: sha256_cbor, vLLM 0.10.2+ (docs §6) -----------------------------


def cbor_head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    if n < 1 << 8:
        return bytes([major << 5 | 24, n])
    if n < 1 << 16:
        return bytes([major << 5 | 25]) + n.to_bytes(2, "big")
    if n < 1 << 32:
        return bytes([major << 5 | 26]) + n.to_bytes(4, "big")
    return bytes([major << 5 | 27]) + n.to_bytes(8, "big")


class Sha256Cbor:
    """Block hashes as vLLM computes them for requests without extra keys."""

    def __init__(self, seed):
        text = seed.encode()
        self.none_hash = hashlib.sha256(cbor_head(3, len(text)) + text).digest()

    def block(self, parent, tokens):
        pre = bytearray(b"\x83")
        pre += cbor_head(2, len(parent)) + parent
        pre += cbor_head(4, len(tokens))
        for token in tokens:
            pre += cbor_head(0, token)
        pre += b"\xf6"
        return hashlib.sha256(pre).digest()

    def chain(self, tokens, block_size):
        parent, digests = self.none_hash, []
        for i in range(len(tokens) // block_size):
            parent = self.block(parent, tokens[i * block_size:(i + 1) * block_size])
            digests.append(parent)
        return digests


def event_key(digest):
    return int.from_bytes(digest[-8:], "big")


# --- wire format ---------------------------------------------------------------


class Wire:
    """Event encoding of one release: arrays up to 0.23, maps from 0.24; replay
    replies carry the topic from 0.26 (docs §3, §4). Supported here: 0.10.2-0.13
    (7-element BlockStored) and 0.26+."""

    def __init__(self, release, topic, dp_rank):
        if (0, 14) <= release < (0, 26) or release < (0, 10, 2):
            raise SystemExit(f"pubsim: release {release} not supported (use 0.10.2-0.13 or 0.26+)")
        self.map_form = release >= (0, 24)
        self.replay_topic = release >= (0, 26)
        self.topic = topic
        self.dp_rank = dp_rank

    def stored(self, hashes, parent, tokens, block_size):
        if not self.map_form:
            return ["BlockStored", hashes, parent, tokens, block_size, None, "GPU"]
        return {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": block_size,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "extra_keys": [None] * len(hashes),
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }

    def removed(self, hashes):
        if not self.map_form:
            return ["BlockRemoved", hashes, "GPU"]
        return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": 0}

    def cleared(self):
        return {"type": "AllBlocksCleared"} if self.map_form else ["AllBlocksCleared"]

    def batch(self, ts, events):
        return msgpack.packb([ts, events, self.dp_rank], use_bin_type=True)


def replay_frames(replay_topic, topic, seq, payload):
    if replay_topic:
        return [b"", topic, seq_frame(seq), payload]
    return [b"", seq_frame(seq), payload]


def replay_end(replay_topic):
    return [b"", b"", END_SEQ, b""] if replay_topic else [b"", END_SEQ, b""]


# --- one publisher (one data-parallel rank) --------------------------------------


class Publisher:
    def __init__(self, ctx, pub_endpoint, connect, router_endpoint, topic, replay_topic,
                 buffer_steps, router_hwm, rng, args):
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        if connect:
            self.pub.connect(pub_endpoint)
        else:
            self.pub.bind(pub_endpoint)
        self.events_endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.router = None
        self.replay_endpoint = None
        if router_endpoint:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.SNDHWM, router_hwm)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(router_endpoint)
            self.replay_endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.topic = topic
        self.replay_topic = replay_topic
        self.buffer = collections.deque(maxlen=buffer_steps)
        self.seq = 0
        self.rng = rng
        self.args = args
        self.stashed = None
        self.replays_served = 0

    def wait_subscribed(self, deadline):
        while time.monotonic() < deadline:
            if self.pub.poll(50):
                message = self.pub.recv()
                if message[:1] == b"\x01":
                    return True
        return False

    def send(self, seq, payload):
        self.pub.send_multipart([self.topic, seq_frame(seq), payload])

    def publish(self, payload):
        """Numbers, buffers and sends one batch, through the impairments."""
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        args, rng = self.args, self.rng
        if seq in args.drop_seqs or rng.random() < args.drop:
            pass
        elif self.stashed is None and rng.random() < args.reorder:
            self.stashed = (seq, payload)
        else:
            self.send(seq, payload)
            if rng.random() < args.duplicate:
                self.send(seq, payload)
            if self.stashed is not None:
                self.send(*self.stashed)
                self.stashed = None
        self.serve_replay(0)

    def flush(self):
        if self.stashed is not None:
            self.send(*self.stashed)
            self.stashed = None

    def serve_replay(self, timeout_ms):
        """Answers replay requests as vLLM's publisher thread does: every
        buffered batch from the requested seq, then the end marker."""
        if self.router is None:
            return
        while self.router.poll(timeout_ms):
            timeout_ms = 0
            frames = self.router.recv_multipart()
            if len(frames) != 3:
                continue
            identity, _, start = frames
            start = int.from_bytes(start, "big")
            lossy = self.replays_served < self.args.replay_lossy
            self.replays_served += 1
            matching = [(s, p) for s, p in self.buffer if s >= start]
            for i, (s, p) in enumerate(matching):
                if lossy and i < len(matching) - 1 and i % 2 == 1:
                    continue
                self.router.send_multipart([identity] + replay_frames(self.replay_topic, self.topic, s, p))
            self.router.send_multipart([identity] + replay_end(self.replay_topic))


def rank_endpoint(endpoint, rank):
    if rank == 0:
        return endpoint
    host, port = endpoint.rsplit(":", 1)
    return f"{host}:{int(port) + rank}"


def free_base_port(count, host="127.0.0.1"):
    """A port such that port .. port+count-1 are free (vLLM puts rank r on port + r).
    Probed with plain sockets, whose close is immediate (a closed ZeroMQ socket
    releases its port later, from its I/O thread)."""
    for _ in range(50):
        probes = []
        try:
            first = socket.socket()
            probes.append(first)
            first.bind((host, 0))
            base = first.getsockname()[1]
            for rank in range(1, count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind((host, base + rank))
            return f"tcp://{host}:{base}"
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise SystemExit("pubsim: no consecutive free ports")


# --- a pod's prefix cache ----------------------------------------------------------


class CacheModel:
    """vLLM's prefix cache reduced to what events show: full blocks, chained
    hashes, prefix hits, LRU eviction with a request's tail blocks evicted first."""

    def __init__(self, rng, hasher, block_size, capacity, wire, prefixes):
        self.rng = rng
        self.hasher = hasher
        self.block_size = block_size
        self.capacity = capacity
        self.wire = wire
        self.prefixes = prefixes
        self.lru = collections.OrderedDict()

    def request(self, events):
        bs, rng = self.block_size, self.rng
        suffix_len = rng.randint(1, 6) * bs + rng.randrange(bs)
        tokens = rng.choice(self.prefixes) + [rng.randrange(1, 151_000) for _ in range(suffix_len)]
        keys = [event_key(d) for d in self.hasher.chain(tokens, bs)]
        hit = 0
        while hit < len(keys) and keys[hit] in self.lru:
            hit += 1
        for key in reversed(keys[:hit]):
            self.lru.move_to_end(key)
        new = keys[hit:]
        wanted = set(keys)
        missing = sum(1 for k in new if k not in self.lru)
        while len(self.lru) + missing > self.capacity:
            victim, _ = self.lru.popitem(last=False)
            if victim in wanted:
                self.lru[victim] = None
                continue
            events.append(self.wire.removed([victim]))
        if new:
            parent = keys[hit - 1] if hit else None
            events.append(self.wire.stored(new, parent, tokens[hit * bs:len(keys) * bs], bs))
            for key in reversed(new):
                self.lru[key] = None
                self.lru.move_to_end(key)

    def step(self, clear):
        events = []
        if clear:
            self.lru.clear()
            events.append(self.wire.cleared())
        for _ in range(self.rng.randint(1, 3)):
            self.request(events)
        return events


# --- modes -------------------------------------------------------------------------


def stream(args):
    release = release_tuple(args.release)
    ctx = zmq.Context()
    rng = random.Random(args.seed)
    hasher = Sha256Cbor(args.hash_seed)
    bs = args.block_size
    prefixes = [[rng.randrange(1, 151_000) for _ in range(rng.randint(1, 4) * bs)] for _ in range(8)]
    topic = args.topic.encode()
    router_hwm = 2 * (args.buffer_steps + 1) if release >= (0, 33) else 1000

    replay_base = None
    if args.replay:
        replay_base = free_base_port(args.dp_size) if args.replay == "auto" else args.replay
    events_base = args.connect or args.bind or free_base_port(args.dp_size)
    publishers = [
        Publisher(ctx, rank_endpoint(events_base, rank), bool(args.connect),
                  replay_base and rank_endpoint(replay_base, rank), topic, release >= (0, 26),
                  args.buffer_steps, router_hwm, random.Random(f"{args.seed}/{rank}/impair"), args)
        for rank in range(args.dp_size)
    ]
    models = [
        CacheModel(random.Random(f"{args.seed}/{rank}/work"), hasher, bs, args.capacity,
                   Wire(release, topic, rank), prefixes)
        for rank in range(args.dp_size)
    ]
    emit({
        "event": "ready",
        "events": publishers[0].events_endpoint,
        "replay": publishers[0].replay_endpoint,
    })
    wait_for_start(publishers, args)
    clear_at = set(args.clear_at)
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    start = time.monotonic()
    for step in range(args.batches):
        if step == args.batches - args.clean_tail:
            args.drop = args.reorder = args.duplicate = 0.0
            for publisher in publishers:
                publisher.flush()
        for publisher, model in zip(publishers, models):
            payload = model.wire.batch(time.time(), model.step(step in clear_at))
            publisher.publish(payload)
        if interval:
            delay = start + (step + 1) * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    for publisher in publishers:
        publisher.flush()
    emit({
        "event": "done",
        "ranks": [
            {"rank": rank, "last_seq": publisher.seq - 1, "blocks": sorted(model.lru)}
            for rank, (publisher, model) in enumerate(zip(publishers, models))
        ],
    })
    linger(publishers, args.linger)


def wait_for_start(publishers, args):
    """Waits for each publisher's subscriber (unless --no-wait) and for a line on
    stdin (with --wait-stdin), so a test can finish its setup first."""
    if not args.no_wait:
        deadline = time.monotonic() + 10
        for publisher in publishers:
            if not publisher.wait_subscribed(deadline):
                raise SystemExit("pubsim: no subscriber")
    if args.wait_stdin:
        sys.stdin.readline()


def linger(publishers, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for publisher in publishers:
            publisher.serve_replay(20)


def hash_keys(hashes):
    keys = []
    for h in hashes:
        keys.append(h if isinstance(h, int) else int(h["bin_hex"][-16:], 16))
    return keys


def event_field(event, index, name):
    return event[index] if isinstance(event, list) else event[name]


def vectors(args):
    with open(VECTORS) as f:
        formats = json.load(f)["formats"]
    chosen = args.formats or list(range(len(formats)))
    ctx = zmq.Context()
    publishers, described = [], []
    for index in chosen:
        fmt = formats[index]
        release = release_tuple(fmt["versions"][0])
        frames = [[bytes.fromhex(h) for h in pub["frames_hex"]] for pub in fmt["pub_frames"]]
        topic = frames[0][0]
        # Reply frames built the way this release's ROUTER builds them must equal the recording.
        recorded = [[bytes.fromhex(h) for h in m] for m in fmt["replay"]["frames_received_by_DEALER_hex"]]
        start = fmt["replay"]["request_start_seq"]
        rebuilt = [replay_frames(release >= (0, 26), topic, int.from_bytes(f[1], "big"), f[2])
                   for f in frames if int.from_bytes(f[1], "big") >= start]
        rebuilt.append(replay_end(release >= (0, 26)))
        if rebuilt != recorded:
            raise SystemExit(f"pubsim: replay frames of format {index} differ from the recording")
        endpoint = args.connect or "tcp://127.0.0.1:*"
        publisher = Publisher(ctx, endpoint, bool(args.connect), "tcp://127.0.0.1:*" if args.replay else None,
                              topic, release >= (0, 26), 10_000, 1000, random.Random(index), args)
        publisher.frames = frames
        publishers.append(publisher)
        decoded = [pub["decoded"] for pub in fmt["pub_frames"]]
        base = hash_keys(event_field(decoded[1][1][0], 1, "block_hashes"))
        lora = hash_keys(event_field(decoded[2][1][0], 1, "block_hashes"))
        described.append({
            "format": index,
            "versions": fmt["versions"],
            "int_hashes": fmt["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] == "1",
            "events": publisher.events_endpoint,
            "replay": publisher.replay_endpoint,
            "expected": {"base": base, "lora": lora},
        })
    emit({"event": "ready", "publishers": described})
    wait_for_start(publishers, args)
    for publisher in publishers:
        for topic, seq, payload in publisher.frames:
            seq = int.from_bytes(seq, "big")
            publisher.buffer.append((seq, payload))
            publisher.seq = seq + 1
            if seq not in args.drop_seqs:
                publisher.pub.send_multipart([topic, seq_frame(seq), payload])
    emit({"event": "done"})
    linger(publishers, args.linger)


def selftest(_args):
    with open(VECTORS) as f:
        data = json.load(f)
    tokens = data["scenario"]["token_ids_first_64"]
    hasher = Sha256Cbor(data["scenario"]["PYTHONHASHSEED"])
    keys = [event_key(d) for d in hasher.chain(tokens, 16)]
    for fmt in data["formats"]:
        if fmt["hash_algo"] != "sha256_cbor":
            continue
        decoded = [pub["decoded"] for pub in fmt["pub_frames"]]
        announced = hash_keys(event_field(decoded[0][1][0], 1, "block_hashes")) + \
            hash_keys(event_field(decoded[1][1][0], 1, "block_hashes"))
        if announced != keys:
            raise SystemExit(f"pubsim: hashes differ from the vectors for {fmt['versions']}")
        wire = Wire(release_tuple(fmt["versions"][0]), b"", 0) if (
            release_tuple(fmt["versions"][0]) < (0, 14) or release_tuple(fmt["versions"][0]) >= (0, 26)) else None
        if wire is not None and fmt["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] == "1" and \
                release_tuple(fmt["versions"][0]) < (0, 33):
            payload = wire.batch(1754006400.75, [wire.stored(keys[2:4], keys[1], tokens[32:64], 16)])
            if payload.hex() != fmt["pub_frames"][1]["payload_hex"]:
                raise SystemExit(f"pubsim: encoding differs from the vectors for {fmt['versions']}")
    emit({"event": "selftest", "ok": True})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["vectors", "stream", "selftest"])
    parser.add_argument("--connect", help="connect the PUB to this SUB endpoint (kvgate binds); default: bind")
    parser.add_argument("--bind", help="stream: PUB endpoint to bind (rank r on port + r); default: free ports")
    parser.add_argument("--replay", help="ROUTER endpoint to bind ('auto': free ports)")
    parser.add_argument("--topic", default="kv@10.0.0.1@Qwen3-32B")
    parser.add_argument("--release", default="0.11.0")
    parser.add_argument("--formats", type=int, nargs="*", help="vectors: format indices (default all)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed")
    parser.add_argument("--hash-seed", default="42", help="the pod's PYTHONHASHSEED")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=256, help="prefix cache size in blocks")
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0, help="batches per second (0: as fast as possible)")
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--buffer-steps", type=int, default=10_000)
    parser.add_argument("--clear-at", type=int, nargs="*", default=[], help="steps that reset the cache")
    parser.add_argument("--drop", type=float, default=0.0)
    parser.add_argument("--drop-seqs", type=int, nargs="*", default=[])
    parser.add_argument("--reorder", type=float, default=0.0)
    parser.add_argument("--duplicate", type=float, default=0.0)
    parser.add_argument("--clean-tail", type=int, default=0, help="last batches sent without impairments")
    parser.add_argument("--replay-lossy", type=int, default=0,
                        help="replay requests answered with every other batch missing (the first N)")
    parser.add_argument("--wait-stdin", action="store_true", help="start sending after a line on stdin")
    parser.add_argument("--no-wait", action="store_true", help="send without waiting for the subscription")
    parser.add_argument("--linger", type=float, default=30.0, help="seconds to keep serving replay after the end")
    args = parser.parse_args()
    args.drop_seqs = set(args.drop_seqs)
    {"vectors": vectors, "stream": stream, "selftest": selftest}[args.mode](args)


if __name__ == "__main__":
    main()
