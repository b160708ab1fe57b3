#!/usr/bin/env python3
"""Binds a signed-in benchmark session to a device key, as the WebCrypto fallback does in a
browser (see docs/threat-model.md, "The protocol"): prints the Cookie header value (session +
bound cookie) that wrk then sends. Usage: bench/bind.py GATEWAY_HOST:PORT SESSION_COOKIE"""
import json
import os
import re
import sys
import urllib.request

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

gw, session = sys.argv[1], sys.argv[2]
base = f"http://{gw}"
cookies = {k: v for k, v in (c.split("=", 1) for c in session.split("; "))}


def request(path, body=None, csrf=None):
    # The bound cookie counts only for the User-Agent it was issued to: the one wrk sends.
    headers = {
        "Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()),
        "Accept": "application/json",
        "User-Agent": os.environ.get("BENCH_UA", "portcullis-bench"),
    }
    if body is not None:
        headers.update({"Content-Type": "application/json", "Origin": base, "X-CSRF-Token": csrf})
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req) as resp:
        for h in resp.headers.get_all("Set-Cookie") or []:
            name, value = h.split(";", 1)[0].split("=", 1)
            cookies[name] = value
        return resp.read().decode()


page = request("/_portcullis/bind")
csrf = re.search(r'data-csrf="([^"]+)"', page).group(1)
challenge = json.loads(request("/_portcullis/bind/challenge", {}, csrf))["challenge"]
key = ec.generate_private_key(ec.SECP256R1())
jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
proof = jwt.encode({"jti": challenge}, key, algorithm="ES256", headers={"typ": "dbsc+jwt", "jwk": jwk})
request("/_portcullis/bind/register", {"proof": proof}, csrf)
print("; ".join(f"{k}={v}" for k, v in cookies.items() if k in ("portcullis-session", "portcullis-bound")))
