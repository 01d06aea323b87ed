#!/usr/bin/env python3
"""What server context takeover (--ws-deflate takeover) costs per connection, against the default shared
per-publish frames (--ws-deflate on): N chat WebSockets offer permessage-deflate and follow a topic; the gateway's
RSS is read, one ~330-byte message is published to the topic (with takeover, each connection's compressor is made
for it), every connection receives it, and RSS is read again. The difference, per connection, is what the
compression context costs. Usage: benches/scripts/deflate-takeover-memory.py [N=2000] (needs a release build).
"""
import asyncio, base64, hashlib, hmac, json, os, socket, subprocess, sys, tempfile, time, urllib.request

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
BIN = os.environ.get("CORELAY_BIN", "target/release/corelay")
SECRET = "bench-secret-0123456789abcdef0123456789"
KEY = "bench-api-key-0123456789abcdef0123456789"


def token(user):
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(
        json.dumps({"sub": user, "iat": now, "exp": now + 3600}).encode())
    sig = hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + b64(sig)


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


async def read_frame(r):
    h = await r.readexactly(2)
    n = h[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await r.readexactly(8), "big")
    return h[0], await r.readexactly(n)


def masked_text(payload):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def client(port, i, ready, got):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write((f"GET /ws?token={token(f'm{i}')} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: corelay.v1\r\n"
             f"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n").encode())
    head = await r.readuntil(b"\r\n\r\n")
    assert b" 101 " in head, head
    await read_frame(r)  # welcome
    w.write(masked_text(json.dumps({"type": "subscribe", "channels": ["topic:mem"]}).encode()))
    await read_frame(r)  # subscribed
    ready.append(1)
    b0, _ = await read_frame(r)  # the broadcast
    got.append(b0)
    return r, w


async def measure(mode):
    data = tempfile.mkdtemp()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    p = subprocess.Popen([BIN, "run", "--listen", f"127.0.0.1:{port}", "--threads", "2", "--data-dir", data,
                          "--auth-secret", SECRET, "--api-key", KEY, "--ws-deflate", mode, "--accept-rate", "1000000"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.readline()
    ready, got = [], []
    tasks = []
    for i in range(0, N, 250):
        batch = [asyncio.create_task(client(port, j, ready, got)) for j in range(i, min(N, i + 250))]
        tasks += batch
        while len(ready) < min(N, i + 250):
            await asyncio.sleep(0.05)
    await asyncio.sleep(2)
    before = rss_kib(p.pid)
    body = json.dumps({"channel": "topic:mem", "body": {"text": "Running ten minutes late, the train stopped at "
                       "Sydenham again. Can you start the standup without me? Notes are in the doc; Priya has the "
                       "deploy checklist.", "seq": 1}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", data=body,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    while len(got) < N:
        await asyncio.sleep(0.05)
    await asyncio.sleep(2)
    after = rss_kib(p.pid)
    compressed = sum(1 for b in got if b & 0x40)
    p.terminate(); p.wait()
    for t in tasks:
        _, w = t.result(); w.close()
    return (after - before) * 1024 / N, compressed


async def main():
    for mode in ["on", "takeover", "on", "takeover"]:
        per, compressed = await measure(mode)
        print(f"--ws-deflate {mode:8}: {N} connections, {compressed} got the message compressed; "
              f"RSS growth from the first compressed message: {per:,.0f} B per connection", flush=True)

asyncio.run(main())
