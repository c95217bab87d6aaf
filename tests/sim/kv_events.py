"""KV-event tools for tests/sim_pods.rs, on pyzmq + plain msgpack (libzmq, not kvgate's code).

  kv_events.py subscribe [EP]      a SUB that binds 127.0.0.1 (random port; prints {"port": p}),
                                   or connects to EP; prints {"connected": true} whenever a
                                   handshake with a publisher completes, then one JSON line per
                                   message, until stdin closes
  kv_events.py replay EP START     DEALER to EP, send ["", START as 8 bytes BE], print every
                                   reply (frames as hex) until the end marker or 5 s of silence
  kv_events.py vector-shapes FILE RELEASE INT
                                   the shape of each event of each pub frame of the vectors
                                   whose versions include RELEASE (INT: "1" or "0")

A message line: {"topic", "seq", "payload_hex", "received_at" (unix s), "decoded", "shapes"},
where decoded follows the vectors' convention (bytes as {"bin_hex": ...}) and shapes holds one
shape per event: msgpack types with map keys in wire order, lists collapsed to their first
element's shape.
"""

import json
import select
import sys
import time

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message


def generic(value):
    if isinstance(value, bytes):
        return {"bin_hex": value.hex()}
    if isinstance(value, list):
        return [generic(v) for v in value]
    if isinstance(value, dict):
        return {k: generic(v) for k, v in value.items()}
    return value


def shape(value):
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes) or (isinstance(value, dict) and set(value) == {"bin_hex"}):
        return "bin"
    if isinstance(value, dict):
        return ["map", [[k, shape(v)] for k, v in value.items()]]
    if isinstance(value, list):
        return ["list", shape(value[0])] if value else ["list"]
    raise TypeError(type(value))


def subscribe(endpoint):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100000)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    if endpoint is None:
        port = sub.bind_to_random_port("tcp://127.0.0.1")
        print(json.dumps({"port": port}), flush=True)
    else:
        sub.connect(endpoint)
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    while True:
        if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.readline():
            return
        for socket, _ in poller.poll(50):
            if socket is monitor:
                recv_monitor_message(monitor)
                print(json.dumps({"connected": True}), flush=True)
                continue
            topic, seq, payload = sub.recv_multipart()
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            print(
                json.dumps(
                    {
                        "topic": topic.decode(),
                        "seq": int.from_bytes(seq, "big"),
                        "payload_hex": payload.hex(),
                        "received_at": time.time(),
                        "decoded": generic(batch),
                        "batch_shape": [shape(batch[0]), "events", shape(batch[2])],
                        "shapes": [shape(event) for event in batch[1]],
                    }
                ),
                flush=True,
            )


def replay(endpoint, start):
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", int(start).to_bytes(8, "big")])
    replies = []
    while dealer.poll(5000):
        frames = dealer.recv_multipart()
        replies.append([frame.hex() for frame in frames])
        if any(frame == b"\xff" * 8 for frame in frames):
            break
    print(json.dumps({"replies": replies}), flush=True)


def vector_shapes(path, release, int_hashes):
    with open(path) as f:
        vectors = json.load(f)
    for fmt in vectors["formats"]:
        if release in fmt["versions"] and fmt["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] == int_hashes:
            print(
                json.dumps(
                    {
                        "pub": [
                            [shape(event) for event in frame["decoded"][1]]
                            for frame in fmt["pub_frames"]
                        ],
                        "replay": fmt["replay"]["frames_received_by_DEALER_hex"],
                    }
                )
            )
            return
    sys.exit(f"no vectors for {release} with int hashes {int_hashes}")


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "subscribe":
        subscribe(sys.argv[2] if len(sys.argv) > 2 else None)
    elif command == "replay":
        replay(sys.argv[2], sys.argv[3])
    elif command == "vector-shapes":
        vector_shapes(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {command}")
