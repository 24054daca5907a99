#!/usr/bin/env python3
"""Writes the seed corpus of frame_decoder and connect_request.

Frames follow proto/src/codec.rs (type u8 | length u16 BE | body); the
fuzz target checks each one against the real decoder. With --certs, also
the DER certificates of cert_identity (issued by tunnel-certs, and two by
openssl). Run from the repository root:
    python3 fuzz/make_corpus.py [--certs target/debug/tunnel-certs]
"""
import ipaddress
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    path = os.path.join(HERE, "corpus", target, name)
    with open(path, "wb") as f:
        f.write(data)


def frame(ty, body):
    return bytes([ty]) + struct.pack(">H", len(body)) + body


def s(text):
    b = text.encode()
    return struct.pack(">H", len(b)) + b


def ip(text):
    a = ipaddress.ip_address(text)
    return bytes([4 if a.version == 4 else 6]) + a.packed


def hello(node, addrs, caps=0, major=1, minor=0):
    body = bytes([major, minor]) + s(node) + bytes([len(addrs)])
    body += b"".join(ip(a) for a in addrs) + struct.pack(">I", caps)
    return frame(0x01, body)


def dial(target, port, deadline):
    return frame(0x10, ip(target) + struct.pack(">HI", port, deadline))


def dial_result(code, msg):
    return frame(0x11, bytes([code]) + s(msg))


F = "frame_decoder"
write(F, "hello", hello("edge-1", ["198.18.0.5", "fd00::5"], caps=2))
write(F, "hello-no-addresses", hello("edge-1", []))
write(F, "hello-32-addresses", hello("n" * 253, ["10.0.0.%d" % i for i in range(32)]))
write(F, "hello-33-addresses", hello("edge-1", ["10.0.0.%d" % i for i in range(33)]))
write(F, "hello-version-2", hello("edge-1", ["198.18.0.5"], major=2, minor=7))
# A later minor version appends fields; this one must ignore them.
write(F, "hello-extension", frame(0x01, hello("edge-1", ["198.18.0.5"])[3:] + b"\x00\x01later"))
write(F, "welcome", frame(0x02, bytes([1, 0]) + s("tunnel-server-0")))
write(F, "refuse", frame(0x03, struct.pack(">H", 2) + s("node name edge-2 is not the certificate's edge-1")))
write(F, "refuse-unknown-code", frame(0x03, struct.pack(">H", 999) + s("")))
write(F, "dial-v4", dial("198.18.0.5", 10250, 5000))
write(F, "dial-v6", dial("fd00::5", 10255, 12000))
write(F, "dial-result-ok", dial_result(0, ""))
write(F, "dial-result-not-allowed", dial_result(1, "198.18.0.5:22 is not on the allow-list"))
write(F, "dial-result-long", dial_result(4, "ü" * 512))
write(F, "drain", frame(0x20, b""))
write(F, "goaway", frame(0x21, struct.pack(">I", 1) + s("replaced by a newer connection of the same node")))
write(F, "dial-then-raw-bytes", dial("198.18.0.5", 10250, 5000) + b"GET /healthz HTTP/1.1\r\n\r\n")
write(F, "control-stream", hello("edge-1", ["198.18.0.5"]) + frame(0x20, b"") + frame(0x20, b""))
write(F, "oversize-header", bytes([0x10, 0xFF, 0xFF]))
write(F, "max-body-header", bytes([0x11, 0x40, 0x00]))
write(F, "unknown-type", bytes([0x7F, 0, 0]))
write(F, "truncated-dial", bytes([0x10, 0, 2, 4, 1]))
write(F, "bad-family", bytes([0x10, 0, 1, 9]))
write(F, "bad-utf8", bytes([0x11, 0, 4, 1, 0, 1, 0xFF]))
write(F, "http-instead", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

C = "connect_request"
def connect(authority, extra=b""):
    return b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + extra + b"\r\n"

write(C, "by-address", connect(b"198.18.0.5:10250"))
write(C, "by-ipv6", connect(b"[fd00::5]:10250"))
write(C, "by-name", connect(b"edge-1:9100"))
write(C, "by-fqdn", connect(b"edge-1.example.internal:10250"))
write(C, "with-early-data", connect(b"198.18.0.5:10250") + b"\x16\x03\x01\x00\x05hello")
write(C, "pipelined", connect(b"edge-1:1") + connect(b"edge-2:2"))
write(C, "http10", b"CONNECT edge-1:9100 HTTP/1.0\r\n\r\n")
write(C, "absolute-form", b"CONNECT http://edge-1:9100/ HTTP/1.1\r\n\r\n")
write(C, "no-port", connect(b"edge-1"))
write(C, "bad-port", connect(b"edge-1:http"))
write(C, "port-out-of-range", connect(b"edge-1:65536"))
write(C, "bad-name", connect(b"Bad_Name:1"))
write(C, "ipv6-unbracketed", connect(b"fd00::5:10250"))
write(C, "ipv6-zone", connect(b"[fe80::1%25eth0]:10250"))
write(C, "mapped-v4", connect(b"[::ffff:198.18.0.5]:10250"))
write(C, "get", b"GET / HTTP/1.1\r\nHost: edge-1\r\n\r\n")
write(C, "get-proxy-form", b"GET http://edge-1:9100/metrics HTTP/1.1\r\nHost: edge-1:9100\r\n\r\n")
write(C, "origin-form", b"CONNECT / HTTP/1.1\r\nHost: edge-1:9100\r\n\r\n")
write(C, "headers", connect(b"edge-1:9100", b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nUser-Agent: curl/8\r\n"))
write(C, "content-length", connect(b"edge-1:9100", b"Content-Length: 5\r\n") + b"hello")
write(C, "chunked", connect(b"edge-1:9100", b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n")
write(C, "bare-lf", b"CONNECT edge-1:9100 HTTP/1.1\nHost: edge-1:9100\n\n")
write(C, "garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
write(C, "half-head", b"CONNECT edge-1:91")
write(C, "raw-authority", b"[::1]:80")

# Certificates, with `--certs PATH/TO/tunnel-certs` (needs openssl too):
# rcgen ones as tunnel-certs issues them, and two openssl ones rcgen does
# not make (no CN; two CNs and mixed SANs).
if len(sys.argv) == 3 and sys.argv[1] == "--certs":
    import subprocess
    import tempfile

    tc = os.path.abspath(sys.argv[2])
    out = os.path.join(HERE, "corpus", "cert_identity")
    with tempfile.TemporaryDirectory() as tmp:
        def run(*args):
            subprocess.run(args, cwd=tmp, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def der(pem, name):
            run("openssl", "x509", "-in", pem, "-outform", "der", "-out", os.path.join(out, name))

        run(tc, "ca", "--out", "ca")
        run(tc, "agent", "--ca", "ca", "--out", "a1", "--node", "edge-1", "--ip", "198.18.0.5", "--ip", "fd00::5")
        run(tc, "agent", "--ca", "ca", "--out", "a2", "--node", "edge-2.example.internal",
            "--ip", "::ffff:10.0.0.1", "--ip", "10.0.0.1", "--ip", "10.0.0.2")
        run(tc, "agent", "--ca", "ca", "--out", "a3", "--node", "edge-3")
        run(tc, "server", "--ca", "ca", "--out", "s1", "--dns", "tunnel.example.com", "--ip", "203.0.113.10")
        der("ca/ca.crt", "rcgen-ca.der")
        der("a1/tls.crt", "rcgen-agent-v4-v6.der")
        der("a2/tls.crt", "rcgen-agent-mapped-duplicate.der")
        der("a3/tls.crt", "rcgen-agent-no-address.der")
        der("s1/tls.crt", "rcgen-server-dns-ip.der")
        with open(os.path.join(out, "rcgen-agent-v4-v6.der"), "rb") as f:
            write("cert_identity", "truncated.der", f.read()[:200])
        write("cert_identity", "garbage", b"not a certificate")
        for subj, extra, name in [
            ("/O=no common name", [], "openssl-no-cn.der"),
            ("/CN=edge-9/CN=second",
             ["-addext", "subjectAltName=IP:192.0.2.1,IP:2001:db8::1,DNS:edge-9,email:a@b"],
             "openssl-two-cn-mixed-sans.der"),
        ]:
            run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", "k.pem", "-subj", subj, *extra, "-days", "1",
                "-outform", "der", "-out", os.path.join(out, name))
